"""
Generate interleaved text and images with MM-Interleaved; writes the images (PNG) and one HTML page.

    python sample.py                                   # the shipped tiny model on assets/demo.txt (CPU)
    python sample.py --prompt="<img:assets/scene_question.png> question: what colour is in the centre? answer:"
    python sample.py --prompt="a red circle in the top left and a blue square in the centre. <img>"
    python sample.py --ckpt=out --prompt_file=my_prompts.txt   # a model folder written by train.py
    python sample.py --ckpt=random --steps=2           # a random tiny model (smoke test)
    python sample.py --clip_path=CLIP --llm_path=VICUNA --sd_path=SD21 [--ckpt=DIR_FROM_TRAIN] --device=cuda \\
        --dtype=float16 --prompt_file=my_prompt.txt    # official components (paper configuration)
    python sample.py --released=MM_INTERLEAVED_PRETRAIN --clip_path=CLIP --llm_path=VICUNA --sd_path=SD21 \\
        --device=cuda --dtype=float16 --prompt_file=my_prompt.txt   # the authors' released checkpoint

Prompt syntax: text with images as <img:path> (paths relative to the prompt file, or to the current folder for
--prompt). The model continues after the end of the prompt; a bare <img> makes it draw a picture there (at the end:
it starts with an image; in the middle: the prompt's text goes on after the model's picture, so
"<img:a.png> x. <img> y. <img>" draws two pictures in a row, the second editing the model's own first).
A prompt file may hold several prompts separated by lines "---"; a first line "# title" names a prompt.
Text is greedy by default (temperature 0) and stops at the end of its first sentence (--stop_at): the world's
captions and answers are one sentence, and its question documents hold 1-3 question / answer pairs, so without a
stop the model rightly goes on to ask itself the next question.
"""
import argparse
import html
import json
import re
import sys
import textwrap
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

import cli
from data import tokenize_document
from generate import SAMPLING, as_8bit, check_fits, draw_image, generate
from checkpoints import build_model
from mmi import PRESETS
from quant import quantize_int8
from weights import CheckpointError

ROOT = Path(__file__).resolve().parent
def fail(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)


p = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--ckpt", default="",
               help="folder with model.safetensors + config.json (train.py's out_dir), or 'random'; default: "
                    "assets/tiny, or the untrained new modules on the official components when they are given")
p.add_argument("--preset", default="tiny", help="model preset for --ckpt=random / official components")
p.add_argument("--clip_path", default="", help="official CLIP folder (with --llm_path and --sd_path)")
p.add_argument("--llm_path", default="")
p.add_argument("--sd_path", default="")
p.add_argument("--released", default="", help="the authors' released checkpoint (folder of .bin files; with "
               "--clip_path, --llm_path and --sd_path)")
p.add_argument("--released_config", default="", help="JSON of the authors' model settings when they differ from "
               "the release (their model_config, alone or under a 'model_config' key)")
p.add_argument("--prompt", default=None, help='e.g. "<img:cat.png> a story: once"; default: --prompt_file')
p.add_argument("--prompt_file", default=str(ROOT / "assets" / "demo.txt"))
p.add_argument("--out_dir", default="samples")
p.add_argument("--seed", type=int, default=0)
p.add_argument("--max_new_tokens", type=int, default=160, help="text tokens per prompt (>= 1)")
p.add_argument("--max_images", type=int, default=1, help="images the model may draw per prompt")
p.add_argument("--temperature", type=float, default=SAMPLING["temperature"], help="0 = greedy")
p.add_argument("--top_p", type=float, default=SAMPLING["top_p"], help="nucleus sampling mass, in (0, 1]")
p.add_argument("--stop_at", default=".", help="text stops once it contains this string ('' = only at </s>)")
p.add_argument("--repetition_penalty", type=float, default=SAMPLING["repetition_penalty"], help="official demo: 1.3")
p.add_argument("--sampler", choices=["ddim", "ddpm"], default=SAMPLING["sampler"])
p.add_argument("--steps", type=int, default=SAMPLING["steps"], help="diffusion steps per image")
p.add_argument("--guidance", type=float, default=SAMPLING["guidance"], help="classifier-free guidance scale (1 = none)")
p.add_argument("--device", default="cpu")
p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
p.add_argument("--quantize", choices=["int8"], default=None,
               help="the LLM's Linear layers in int8 (quant.py; MMFS untouched): Vicuna-13B 24 -> 12 GiB")
p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch's default); tiny models run "
               "fastest on 1 (more threads cost more in synchronisation than they gain)")
def contact_sheet(rows, size=128, pad=8, frame=3):
    """rows: [(title, [(item, generated)])] -> one RGB picture of the whole run: per prompt its title, its pictures in
    order at `size` px (grey frame: given, green: drawn by the model), then its text (the model's in green). Pillow's
    built-in bitmap font: the same pixels on every machine, so the shipped demo's sheet can be pinned."""
    bitmap = getattr(ImageFont, "load_default_imagefont", ImageFont.load_default)  # Pillow >= 10.1 has both
    font = bitmap()
    grey, green, line = (170, 170, 170), (34, 150, 90), 14
    cell = size + 2 * frame + pad
    width = pad + cell * max(5, *(sum(not isinstance(x, str) for x, _ in shown) for _, shown in rows))
    wrap = (width - 2 * pad) // 6  # the bitmap font is 6 px wide

    def text_lines(shown):  # the bitmap font has Latin-1 only: anything else shows as "?"
        return [(chunk.encode("latin-1", "replace").decode("latin-1"), g)
                for x, g in shown if isinstance(x, str) for chunk in textwrap.wrap(x, wrap)]
    height = pad + sum(line + cell + line * len(text_lines(shown)) + pad for _, shown in rows)
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    y = pad
    for title, shown in rows:
        draw.text((pad, y), title, fill="black", font=font)
        y, x = y + line, pad
        for item, generated in shown:
            if not isinstance(item, str):
                edge = size + 2 * frame - 1
                draw.rectangle([x, y, x + edge, y + edge], fill=green if generated else grey)
                sheet.paste(item.resize((size, size), Image.NEAREST), (x + frame, y + frame))
                x += cell
        y += cell
        for chunk, generated in text_lines(shown):
            draw.text((pad, y), chunk, fill=green if generated else "black", font=font)
            y += line
        y += pad
    return sheet


RANGES = {"seed": ">= 0", "max_new_tokens": ">= 1", "max_images": ">= 0", "temperature": ">= 0", "top_p": "(0, 1]",
          "repetition_penalty": "> 0", "steps": ">= 1", "guidance": ">= 0", "threads": ">= 0"}  # cli.check_ranges


def main(argv):
    """The demo on a command line as a list ("--flag=value", ...); importable, so tests call it in-process."""
    p.error = lambda message: fail(f"{message} (python sample.py --help lists the flags)")  # one line, not the usage
    args = p.parse_args(argv)

    cli.check_ranges(vars(args), RANGES)  # one line "error: --flag=value: must be ...", exit status 1 (as fail)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        fail(f"--device={args.device}: not a torch device (e.g. cpu, cuda, cuda:1, mps)")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device={args.device} but CUDA is not available")

    out = cli.writable_dir(args.out_dir, "out_dir")

    # -----------------------------------------------------------------------------
    # the prompts: [(title, items, draw_first)], items = str or PIL images
    IMG = re.compile(r"<img(?::([^>]*))?>")

    def parse_prompt(text, root, title):
        """-> (title, segments): each segment a list of items (str / PIL image) and whether the model then draws
        (a bare <img>). "<img:a.png> x. <img> y. <img>" -> [([a, "x."], True), (["y."], True)]: two pictures in a
        row, the second drawn after the model's own first one."""
        segments, items, pos = [], [], 0
        for m in IMG.finditer(text):
            if text[pos:m.start()].strip():
                items.append(text[pos:m.start()].strip())
            pos = m.end()
            if m[1] is None:  # bare <img>: the model draws here
                segments.append((items, True))
                items = []
                continue
            path = (root / m[1].strip())
            if not path.is_file():
                fail(f"prompt image not found: {path}")
            try:
                with Image.open(path) as im:
                    items.append(im.convert("RGB"))
            except Exception as e:
                fail(f"cannot read prompt image {path}: {e}")
        if text[pos:].strip():
            items.append(text[pos:].strip())
        if items or not segments:
            segments.append((items, False))
        if not any(items for items, _ in segments):
            fail("empty prompt")
        return title, segments

    if args.prompt is not None and not args.prompt.strip():
        fail("--prompt is empty (leave it out to run the demo prompts of --prompt_file)")
    if args.prompt:
        prompts = [parse_prompt(args.prompt, Path.cwd(), "prompt")]
    else:
        pf = Path(args.prompt_file)
        if not pf.is_file():
            fail(f"prompt file not found: {pf}")
        prompts = []
        for i, chunk in enumerate(re.split(r"^---\s*$", pf.read_text(), flags=re.M)):
            lines = chunk.strip().splitlines()
            title = lines.pop(0)[1:].strip() if lines and lines[0].startswith("#") else f"prompt {i + 1}"
            if lines:
                prompts.append(parse_prompt("\n".join(lines), pf.parent, title))

    # -----------------------------------------------------------------------------
    # the model
    if args.preset not in PRESETS:
        fail(f"unknown preset {args.preset!r}; choose from {sorted(PRESETS)}")
    dtype = getattr(torch, args.dtype)
    components = (args.clip_path, args.llm_path, args.sd_path)
    if any(components) and not all(components):
        fail("official components need all of --clip_path, --llm_path and --sd_path")
    if args.released and (args.ckpt or not all(components)):
        fail("--released needs --clip_path, --llm_path and --sd_path, and no --ckpt")
    if not args.ckpt:
        args.ckpt = args.released or ("random" if all(components) else str(ROOT / "assets" / "tiny"))
    torch.manual_seed(args.seed)
    t0 = time.time()
    ck = Path(args.ckpt) if args.ckpt not in ("random", args.released) else None
    if ck is not None and (not (ck / "model.safetensors").is_file() or not (ck / "config.json").is_file()):
        fail(f"no checkpoint at {ck} (needs model.safetensors and config.json from train.py; or pass --ckpt=random)")
    try:
        config = json.loads(Path(args.released_config).read_text()) if args.released_config else {}
        model = build_model(args.preset, ckpt=str(ck or ""), clip=args.clip_path, llm=args.llm_path, sd=args.sd_path,
                            released=args.released, released_config=config.get("model_config", config), dtype=dtype)
        tok = model.tok  # (a missing tokenizer.model: one line too)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        fail(str(e).splitlines()[0])
    if args.quantize:  # on the host, before the move: the GPU never holds the full-precision LLM
        model = model.to(dtype)  # the scales in the compute dtype
        quantize_int8(model.llm, filter=lambda name, linear: ".inserted." not in name)  # MMFS keeps its weights
    model = model.to(args.device, dtype).eval()
    for title, segments in prompts:  # every prompt against the model's limits before any is generated
        items = [x for seg, draw in segments for x in seg + ([torch.zeros(3, 1, 1)] if draw else [])]  # a drawn picture
        try:
            ids, images = tokenize_document(items, tok, model.cfg.n_image_tokens, eos=False)
            check_fits(model, len(ids) + 1, len(images), what=f"prompt [{title}]")
        except ValueError as e:
            fail(str(e))
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters from {args.ckpt} "
          f"({time.time() - t0:.1f} s)")

    # -----------------------------------------------------------------------------
    # generate, save, write the page
    for old in out.glob("p*_*.png"):  # a previous run's pictures: the new page would not show them
        if re.fullmatch(r"p\d+_\d+(_gen)?\.png", old.name):
            old.unlink()
    gen = torch.Generator(args.device).manual_seed(args.seed)

    def as_pil(img):
        if torch.is_tensor(img):
            img = Image.fromarray((img.float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy())
        return img

    sections, rows, n_tokens, n_images, text_time, img_time = [], [], 0, 0, 0.0, 0.0
    def run(context, draw, last):
        """Continue `context` (drawing first if `draw`). Not the last segment: only the picture (the prompt's own text
        follows it)."""
        sampling = dict(temperature=args.temperature, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                        steps=args.steps, sampler=args.sampler, guidance=args.guidance)
        if not last:
            t = time.time()
            return [draw_image(model, context, generator=gen, **sampling)], time.time() - t
        timings = {}
        result = generate(model, context, max_new_tokens=args.max_new_tokens, max_images=args.max_images,
                          begin_image=draw, generator=gen, timings=timings, stop_at=args.stop_at, **sampling)
        return result, timings.get("image_s", 0.0)

    for i, (title, segments) in enumerate(prompts):
        shown, context, t, image_s = [], [], time.time(), 0.0  # shown: (item, generated)
        for k, (items, draw) in enumerate(segments):
            result, secs = run(context + items, draw, k == len(segments) - 1)
            image_s += secs
            shown += [(x, False) for x in items] + [(x, True) for x in result]
            context += items + [x if isinstance(x, str) else as_8bit(x) for x in result]  # as generate() re-encodes it
        dt = time.time() - t
        text_time, img_time = text_time + dt - image_s, img_time + image_s
        generated = [x for x, g in shown if g]
        n_tokens += sum(len(tok.encode(x, bos=False)) for x in generated if isinstance(x, str))
        n_images += sum(1 for x in generated if not isinstance(x, str))
        parts, shown = [], [(x if isinstance(x, str) else as_pil(x), g) for x, g in shown]
        for j, (x, is_gen) in enumerate(shown):
            if isinstance(x, str):
                parts.append(f'<span class="{"gen" if is_gen else "prompt"}">{html.escape(x)}</span>')
            else:
                name = f"p{i + 1}_{j + 1}{'_gen' if is_gen else ''}.png"
                x.save(out / name)
                parts.append(f'<img class="{"gen" if is_gen else "prompt"}" src="{name}" alt="{name}">')
        rows.append((title, shown))
        sections.append(f"<h2>{html.escape(title)}</h2>\n<p>{' '.join(parts)}</p>")
        print(f"[{title}] -> " + " | ".join(x if isinstance(x, str) else "[image]" for x in generated))

    page = out / "index.html"
    page.write_text(f"""<!doctype html>
    <html><head><meta charset="utf-8"><title>mmi samples</title><style>
    body {{ font-family: sans-serif; max-width: 50em; margin: 2em auto; }}
    img {{ width: 128px; image-rendering: pixelated; vertical-align: middle; margin: 4px; border: 3px solid #ccc; }}
    img.gen {{ border-color: #2a7; }}  span.gen {{ background: #dfd; }}
    </style></head><body>
    <h1>MM-Interleaved samples</h1>
    <p>Prompt in plain text and grey frames; <span class="gen">generated in green</span>. Checkpoint: {html.escape(str(args.ckpt))},
    seed {args.seed}, {args.sampler} {args.steps} steps, guidance {args.guidance}, temperature {args.temperature}.</p>
    {chr(10).join(sections)}
    </body></html>
    """)
    print(f"text: {n_tokens} tokens at {n_tokens / max(text_time, 1e-9):.1f} tokens/s; "
          f"images: {n_images}" + (f" at {img_time / n_images:.2f} s per image" if n_images else ""))
    contact_sheet(rows).save(out / "sheet.png")
    print(f"wrote {page}, {out / 'sheet.png'} and {n_images} generated images in {out}/")


if __name__ == "__main__":
    main(sys.argv[1:])
