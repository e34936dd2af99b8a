"""
int8 weight-only quantisation of frozen nn.Linear layers, in plain PyTorch (the gpt-fast recipe).

Each output channel (row of the weight) gets one symmetric scale, s = max|w_row| / 127, and the weight is stored as
round(w / s) in int8: half the bytes of bf16 / fp16, a quarter of fp32. Activations stay in the compute dtype; the
layer dequantises its weight on the fly. Only frozen layers are meant for it: int8 weights get no gradients.

    from quant import quantize_int8
    quantize_int8(model.llm)          # every frozen Linear of the LLM (MMFS and anything trainable untouched)
    quantize_int8(llama, filter=lambda name, lin: True)   # every Linear of a module, frozen or not
    quantize_int8(meta_model)         # works on the meta device: a memory plan counts the bytes without weights

A quantised module saves and loads like any other (weight_int8 and scales are frozen parameters, in its state_dict);
to load a saved one, quantise a freshly built (e.g. meta-device) module first, then load_state_dict(..., assign=True).
"""
import torch
import torch.nn.functional as F
from torch import nn

QMAX = 127  # symmetric: -127..127 (not -128), so that -w quantises to -q


def quantize_weight(weight, dtype=None):
    """weight [out, in] -> (int8 [out, in], scales [out] in `dtype`, default the weight's). The scale is rounded to
    its dtype first and the weight divided by that rounded scale, so dequantising with the stored scales is exact
    to the int8 rounding (no second error from rounding the scales)."""
    dtype = dtype or weight.dtype
    w = weight.detach().float()
    scales = (w.abs().amax(dim=1) / QMAX).clamp(min=torch.finfo(dtype).tiny).to(dtype)  # a zero row: scale tiny
    q = (w / scales.float()[:, None]).round().clamp(-QMAX, QMAX).to(torch.int8)
    return q, scales


class _Int8Matmul(torch.autograd.Function):
    """y = F.linear(x, W_int8) * s. Written by hand for backward: autograd of the plain expression would save the
    dequantised weight (a full compute-dtype copy per layer) whenever x needs a gradient, as it does in a frozen LLM
    below trainable MMFS layers; here only the int8 weight (already held) is saved, and dequantised again."""

    @staticmethod
    def forward(ctx, x, weight_int8, scales):
        ctx.save_for_backward(weight_int8, scales)
        ctx.x_dtype = x.dtype
        # Dequantise to the dtype the original weight had (the scales'): same dtype rules as the Linear it replaces
        # (autocast casts it as it would the weight). The scale multiplies the output [.., out], not the weight
        # [out, in]: one [out, in] temporary (the cast) instead of two, and fewer multiplies whenever the tokens of
        # a call are fewer than the input width (every decoding step).
        y = F.linear(x, weight_int8.to(scales.dtype))
        return y * scales.to(y.dtype)  # autocast may have made y bf16: keep its dtype, as the Linear's output

    @staticmethod
    def backward(ctx, grad):
        weight_int8, scales = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        g = grad * scales.to(grad.dtype)  # d/dx of (x W^T) * s = (grad * s) W
        return (g @ weight_int8.to(g.dtype)).to(ctx.x_dtype), None, None


class Int8Linear(nn.Module):
    """A frozen nn.Linear with its weight in int8 and one scale per output channel (see module docstring)."""

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        # frozen parameters, not buffers: DDP broadcasts every buffer from rank 0 at every forward (12 GB a step for
        # Vicuna-13B); parameters that need no gradient it leaves alone. .to(dtype) casts the scales, never the int8.
        frozen = lambda t: nn.Parameter(t, requires_grad=False)  # noqa: E731
        self.weight_int8 = frozen(torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.scales = frozen(torch.ones(out_features, dtype=dtype, device=device))
        self.bias = frozen(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        w = linear.weight
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, w.device, w.dtype)
        weight_int8, scales = quantize_weight(w)
        q.weight_int8 = nn.Parameter(weight_int8, requires_grad=False)
        q.scales = nn.Parameter(scales, requires_grad=False)
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        return q

    def dequantized(self):
        """The weight this layer computes with, [out, in] in the scales' dtype."""
        return self.weight_int8.to(self.scales.dtype) * self.scales[:, None]

    def forward(self, x):
        y = _Int8Matmul.apply(x, self.weight_int8, self.scales)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               f"scales={self.scales.dtype}"


def frozen(name, linear):
    """The default filter: a Linear whose weight needs no gradient."""
    return not linear.weight.requires_grad


def quantize_int8(module: nn.Module, filter=frozen) -> list[str]:
    """Replace, in place, every nn.Linear of `module` for which filter(name, linear) is true by an Int8Linear;
    returns the names replaced. Everything else (other layers, trainable Linear layers by default, buffers) is left
    as it is. A Linear whose weight is shared with another module (a tied LM head) is skipped: quantising it would
    keep the full-precision matrix for the other user and add an int8 copy."""
    shared = {id(p) for m in module.modules() if not isinstance(m, nn.Linear) for p in m.parameters(recurse=False)}
    done = []
    for name, parent in list(module.named_modules()):
        for child_name, child in list(parent.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is nn.Linear and id(child.weight) not in shared and filter(full, child):
                setattr(parent, child_name, Int8Linear.from_linear(child))
                done.append(full)
    return done


def linear_weight_bytes(module: nn.Module) -> int:
    """Bytes held by the weights of the Linear / Int8Linear layers of `module` (biases and scales included)."""
    total = 0
    for m in module.modules():
        if isinstance(m, (nn.Linear, Int8Linear)):
            total += sum(t.numel() * t.element_size() for t in m.parameters(recurse=False))
    return total
