"""Products with the vocabulary, a block at a time, in float32.

Everything that reads all V logits of a state goes through W_out (V × D): log Z1 = logsumexp(W_out·h),
the soft value V(s), the KL between two policies, the decoding logits. Two things make this module:

Memory. An (N, V) tensor for every scored state of a batch is the largest thing in a step (on
Llama-3.1-8B, V = 128256: 4096 states are 2 GB in float32, twice that with a gradient). Here the
states go through a block at a time (LOGIT_CHUNK elements of logits each), and the gradient of a
log-sum-exp is formed while the block's softmax is at hand (_ProjectedLogsumexp).

Precision. Q-Adapter's quantities are small differences of large ones: V(s) ≈ 0.03 nats is
α̃·logsumexp(W·(u + α0·h)/α̃) − α0·logsumexp(W·h), two log-sum-exps of about 10. With a bf16 W_out,
logits computed in bf16 carry errors of ±0.06 at 20, and V would be as wrong as it is large. So the
products are always taken in float32: x in float32, and a bf16 / fp16 W_out upcast VOCAB_ROWS rows
at a time (never the whole matrix: on Llama-3.1-8B a float32 copy would be another 2 GB). The
blocks of one state block are then combined as a streaming softmax does: a running maximum m, the
sum s = Σ exp(z − m) and, for the gradient, g = Σ exp(z − m)·W, each rescaled by exp(m_old − m_new)
when the maximum grows. Cost for a low-precision W_out: each block of states reads W_out once more
and upcasts it (V·D·6 bytes of memory traffic), and the products run in float32, not bf16 (on a
GPU without TF32 several times slower than the bf16 products they replace). A float32 W_out is one
block: nothing is copied, and the arithmetic is what a single softmax does.
"""
import torch
import torch.nn.functional as F

LOGIT_CHUNK = 2**24  # elements of one (states, vocabulary rows) block of logits: 64 MB in float32
VOCAB_ROWS = 8192  # rows of a bf16 / fp16 W_out upcast to float32 at a time (128 MB at D = 4096)


def _float32_blocks(weight):
    """(start row, rows of W in float32): the whole W when it is float32 already, else VOCAB_ROWS at a time."""
    if weight.dtype == torch.float32:
        yield 0, weight
        return
    for j in range(0, weight.shape[0], VOCAB_ROWS):
        yield j, weight[j:j + VOCAB_ROWS].float()


def _state_rows(weight):
    """How many states go through the vocabulary together: LOGIT_CHUNK elements of logits per block."""
    block = weight.shape[0] if weight.dtype == torch.float32 else min(weight.shape[0], VOCAB_ROWS)
    return max(1, LOGIT_CHUNK // block)


def project(x, weight):
    """(…, D) -> (…, V): W·x in float32, the whole logits (the plain path and decoding)."""
    x = x.float()
    if weight.dtype == torch.float32:
        return F.linear(x, weight)
    out = x.new_empty(*x.shape[:-1], weight.shape[0])  # (…, V)
    for j, w in _float32_blocks(weight):
        out[..., j:j + w.shape[0]] = F.linear(x, w)
    return out


def _logsumexp_rows(x, weight, tau, with_grad):
    """lse (n,) = logsumexp_v((W·x)_v / τ) of states x (n, D) float32, streaming over vocabulary
    blocks; with_grad also d lse / dx = softmax(W·x / τ)·W / τ (n, D), else None."""
    m = s = g = None
    for _, w in _float32_blocks(weight):
        z = F.linear(x, w)  # (n, v) logits of this block
        if tau != 1.0:
            z.div_(tau)  # in place, as below: one (n, v) tensor per block
        m_new = z.amax(-1) if m is None else torch.maximum(m, z.amax(-1))  # (n,)
        p = z.sub_(m_new[:, None]).exp_()  # (n, v) exp(z − m_new)
        rescale = None if m is None else torch.exp(m - m_new)[:, None]  # (n, 1) earlier blocks' sums
        s = p.sum(-1, keepdim=True) if m is None else s * rescale + p.sum(-1, keepdim=True)  # (n, 1)
        if with_grad:
            g = p @ w if m is None else g * rescale + p @ w  # (n, D)
        m = m_new
    return m + s.squeeze(-1).log(), (g / (s * tau) if with_grad else None)


def _logsumexp_chunks(x, weight, tau, with_grad):
    """_logsumexp_rows over all N states (N, D), a block of states at a time."""
    x = x.float()
    rows = _state_rows(weight)
    lse = x.new_empty(x.shape[0])  # (N,)
    grad = torch.empty_like(x) if with_grad else None  # (N, D)
    for i in range(0, x.shape[0], rows):
        lse[i:i + rows], g = _logsumexp_rows(x[i:i + rows], weight, tau, with_grad)
        if with_grad:
            grad[i:i + rows] = g
    return lse, grad


class _ProjectedLogsumexp(torch.autograd.Function):
    """The gradient is computed in the forward pass, block by block, while each block's softmax is
    at hand, so the backward pass only scales it: the (N, V) softmax is never stored whole, and
    the cost is the same two V × D products per state that autograd would spend. The gradient
    flows to x only: W must be frozen, and τ a plain number (projected_logsumexp checks both)."""

    @staticmethod
    def forward(ctx, x, weight, tau):
        lse, grad = _logsumexp_chunks(x, weight, tau, with_grad=True)
        ctx.save_for_backward(grad)
        return lse

    @staticmethod
    def backward(ctx, grad_lse):
        (grad,) = ctx.saved_tensors
        return grad_lse[:, None] * grad, None, None


def projected_logsumexp(x, weight, tau=1.0):
    """logsumexp over the vocabulary of W·x / τ, x: (N, D) -> (N,) float32, without an (N, V)
    tensor: log Z1 = projected_logsumexp(h), and V(s) = α̃·projected_logsumexp(u + α0·h, α̃) − α0·log Z1."""
    if weight.requires_grad:
        raise ValueError("projected_logsumexp: its gradient flows to x only, so W must not require grad "
                         "(the frozen output layer)")
    if torch.is_tensor(tau):
        raise TypeError("projected_logsumexp: τ must be a Python number (no gradient is computed for it)")
    if torch.is_grad_enabled() and x.requires_grad:
        return _ProjectedLogsumexp.apply(x, weight, float(tau))
    with torch.no_grad():
        return _logsumexp_chunks(x, weight, float(tau), with_grad=False)[0]


def _kl_rows(x_p, x_q, weight):
    """KL(softmax(W·x_p) ‖ softmax(W·x_q)) of states (n, D) float32, streaming over vocabulary
    blocks: KL = E_p[z_p − z_q] − lse(z_p) + lse(z_q), with E_p kept as Σ exp(z_p − m_p)·(z_p − z_q)."""
    m_p = m_q = s_p = s_q = a = None
    for _, w in _float32_blocks(weight):
        z_p, z_q = F.linear(x_p, w), F.linear(x_q, w)  # (n, v) each
        new_p, new_q = z_p.amax(-1), z_q.amax(-1)  # (n,)
        if m_p is not None:
            new_p, new_q = torch.maximum(m_p, new_p), torch.maximum(m_q, new_q)
        e_p = (z_p - new_p[:, None]).exp()  # (n, v)
        terms = (e_p.sum(-1), (z_q - new_q[:, None]).exp().sum(-1), (e_p * (z_p - z_q)).sum(-1))
        if m_p is None:
            s_p, s_q, a = terms
        else:
            r_p, r_q = torch.exp(m_p - new_p), torch.exp(m_q - new_q)  # (n,) rescale earlier blocks
            s_p, s_q, a = s_p * r_p + terms[0], s_q * r_q + terms[1], a * r_p + terms[2]
        m_p, m_q = new_p, new_q
    return a / s_p - (m_p + s_p.log()) + (m_q + s_q.log())


@torch.no_grad()
def projected_kl(x_p, x_q, weight):
    """KL(softmax(W·x_p) ‖ softmax(W·x_q)) per row, x_p, x_q: (N, D) -> (N,) float32, a block of
    states at a time, so no (N, V) tensor is whole. Evaluation's measure of how far a policy moved:
    pi~ is softmax(W_out·(u + α0·x1)/α̃) and pi1 is softmax(W_out·x1) (fused_path.directions)."""
    x_p, x_q = x_p.float(), x_q.float()
    rows = _state_rows(weight)
    kl = x_p.new_empty(x_p.shape[0])  # (N,)
    for i in range(0, x_p.shape[0], rows):
        kl[i:i + rows] = _kl_rows(x_p[i:i + rows], x_q[i:i + rows], weight)
    return kl
