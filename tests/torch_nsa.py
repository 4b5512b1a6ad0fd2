#!/usr/bin/python3
"""torch_nsa.py — an independent PyTorch reference of the nsa model (shared/SPEC.md).

The C library is tested against this file, so it is written for clarity, not speed: every
attention path is a softmax over an explicit boolean mask on a full score matrix. It reads
the same safetensors checkpoints as `nsa` (SPEC §7) with a pure-Python reader, since the
`safetensors` package is not available under Debian's python3.

Command line (run with /usr/bin/python3; float32 unless --f64; outputs in that dtype):
  torch_nsa.py forward CKPT X.npy OUT.npy [--all] [--f64]
      X [B,T,E] float -> OUT [B,D] (last position) or [B,T,D] (--all);
      for a checkpoint with vocab_size > 0, X [B,T] int tokens -> OUT logits [B,T,V]
      (a float X still gives the model output, without embed and lm_head)
  torch_nsa.py grad CKPT TOKENS.npy OUT.safetensors [--f64]
      gradients of the mean next-token cross-entropy for every parameter (SPEC names),
      the config and "loss" in the metadata
  torch_nsa.py attn Q.npy K.npy V.npy GATES.npy OUT.npy --block-size b --window-size w
      --compression-ratio r [--compression-block l] --num-selected-blocks n
      [--select-score mean_key|cmp_attn] [--select-fixed none|paper] [--scale S]
      [--block-indices IDX.npy] [--indices-out IDX.npy]
      [--dout DOUT.npy --grads-out G.safetensors] [--f64]
      the attention op of SPEC §6 (mean compression); the grads file holds dq, dk, dv, dgates

Choices where SPEC is silent (the C implementation must make the same ones):
  * Selection scores are not multiplied by the scale 1/sqrt(d) (a positive factor does not
    change the ranking). mean_key sums the per-query-head dot products q_{t,h}.mean(k) over
    the H/G heads that read the kv head.
  * cmp_attn: compressed token j (span [j*r, j*r+l)) overlaps block i (span [i*b, (i+1)*b))
    when j*r < (i+1)*b and j*r + l > i*b; p_cmp is summed over the group's query heads.
  * Top-k: block i' ranks above block i when score(i') > score(i), or the scores are equal
    and i' < i. With select_fixed = paper the fixed blocks {0, c, c-1} (c = t // b, only those
    that are candidates) are selected first and the remaining n - |fixed| slots go to the best
    other candidates.
  * block_indices (SPEC §6): -1 slots are ignored, a repeated index counts once, an index
    above t // b adds no key (its keys are in the future), an index outside [-1, nb) is an
    error. A query whose selected set has no visible key gets o_slc = 0 (like o_cmp).
  * RoPE rotates (x_{2i}, x_{2i+1}) by angle a = t * theta^(-2i/d) to
    (x_{2i} cos a - x_{2i+1} sin a, x_{2i} sin a + x_{2i+1} cos a); angles in float64.
  * The compressed token count is Tc = floor((T - l) / r) + 1 when T >= l, else 0.
  * The token gate reads z, the attention's (normalised) input.
"""
import argparse
import json
import math
import struct
import sys

import numpy as np
import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------
# safetensors (pure Python + numpy)

_ST_DTYPES = {"F32": "<f4", "F64": "<f8", "I32": "<i4", "I64": "<i8", "U16": "<u2",
              "BF16": "<u2"}


def bf16_bits_to_f32(bits):
    """uint16 bfloat16 bit patterns -> float32 array."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16_bits(x):
    """float32 -> bfloat16 bit patterns, round to nearest even (NaN kept a NaN)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(np.asarray(x, dtype=np.float32))
    return np.where(nan, np.uint16(0x7FC0), rounded).astype(np.uint16)


def read_safetensors(path):
    """Returns ({name: numpy array}, {metadata key: str}). BF16 comes back as float32."""
    with open(path, "rb") as f:
        blob = f.read()
    if len(blob) < 8:
        raise ValueError(f"{path}: truncated (no header length)")
    (n,) = struct.unpack("<Q", blob[:8])
    if 8 + n > len(blob):
        raise ValueError(f"{path}: header length {n} past the end of the file")
    header = json.loads(blob[8:8 + n].decode("utf-8"))
    data = memoryview(blob)[8 + n:]
    meta = header.pop("__metadata__", {}) or {}
    tensors = {}
    for name, info in header.items():
        dtype, shape = info["dtype"], [int(s) for s in info["shape"]]
        begin, end = info["data_offsets"]
        if dtype not in _ST_DTYPES:
            raise ValueError(f"{path}: tensor {name}: unsupported dtype {dtype}")
        npdt = np.dtype(_ST_DTYPES[dtype])
        if not (0 <= begin <= end <= len(data)) or end - begin != npdt.itemsize * math.prod(shape):
            raise ValueError(f"{path}: tensor {name}: bad data_offsets {begin},{end}")
        arr = np.frombuffer(data[begin:end], dtype=npdt).reshape(shape).copy()
        tensors[name] = bf16_bits_to_f32(arr) if dtype == "BF16" else arr
    return tensors, {str(k): str(v) for k, v in meta.items()}


def write_safetensors(path, tensors, metadata=None, bf16=False):
    """tensors: {name: array-like} written in the given order; float arrays keep their dtype
    (F32/F64) unless bf16=True, which stores every float as BF16."""
    header, chunks, offset = {}, [], 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, arr in tensors.items():
        if isinstance(arr, torch.Tensor):
            arr = arr.detach().cpu().numpy()
        arr = np.asarray(arr)
        if arr.dtype.kind == "f" and bf16:
            dtype, raw = "BF16", f32_to_bf16_bits(arr.astype(np.float32)).tobytes()
        else:
            dtype = {"float32": "F32", "float64": "F64", "int32": "I32", "int64": "I64",
                     "uint16": "U16"}[str(arr.dtype)]
            raw = np.ascontiguousarray(arr).astype(_ST_DTYPES[dtype]).tobytes()
        header[name] = {"dtype": dtype, "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # pad so the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for raw in chunks:
            f.write(raw)


# ----------------------------------------------------------------------------------------
# Configuration (SPEC §1)

# name -> (type, default); None = required. Enum options are strings.
OPTIONS = {
    "embed_dim": (int, None), "hidden_size": (int, 256), "num_heads": (int, 8),
    "head_dim": (int, 32), "window_size": (int, 64), "block_size": (int, 16),
    "num_selected_blocks": (int, 8), "compression_ratio": (int, 4), "num_layers": (int, 4),
    "dropout": (float, 0.1), "seq_len": (int, 256), "num_kv_heads": (int, 0),
    "compression_block": (int, 0), "compress": (str, "mean"), "select_score": (str, "mean_key"),
    "select_fixed": (str, "none"), "gate": (str, "static"), "rope_theta": (float, 0.0),
    "vocab_size": (int, 0),
}
ENUMS = {"compress": ("mean", "conv", "mlp"), "select_score": ("mean_key", "cmp_attn"),
         "select_fixed": ("none", "paper"), "gate": ("static", "token")}


class Config:
    """Every option of SPEC §1 as an attribute. num_kv_heads / compression_block of 0 mean
    the defaults; use .G and .l for the effective values."""

    def __init__(self, **kw):
        for name, (typ, default) in OPTIONS.items():
            value = kw.pop(name, default)
            if value is None:
                raise ValueError(f"{name}: required")
            setattr(self, name, typ(value))
        if kw:
            raise ValueError(f"unknown option(s): {', '.join(sorted(kw))}")
        self.validate()

    @property
    def G(self):
        return self.num_kv_heads or self.num_heads

    @property
    def l(self):
        return self.compression_block or self.compression_ratio

    def validate(self):
        def need(ok, name, rule):
            if not ok:
                raise ValueError(f"{name} = {getattr(self, name)}: {rule}")
        for name in ("embed_dim", "hidden_size", "num_heads", "head_dim", "window_size",
                     "block_size", "num_selected_blocks", "compression_ratio", "num_layers",
                     "seq_len"):
            need(getattr(self, name) >= 1, name, "must be >= 1")
        need(0 <= self.dropout < 1, "dropout", "must be in [0, 1)")
        need(self.num_kv_heads >= 0 and self.num_heads % self.G == 0, "num_kv_heads",
             f"must divide num_heads ({self.num_heads})")
        need(self.compression_block >= 0 and self.l % self.compression_ratio == 0,
             "compression_block", f"must be a multiple of compression_ratio "
             f"({self.compression_ratio})")
        for name, values in ENUMS.items():
            need(getattr(self, name) in values, name, f"must be one of {', '.join(values)}")
        need(self.select_score != "cmp_attn" or self.block_size % self.compression_ratio == 0,
             "select_score", "cmp_attn needs block_size % compression_ratio == 0")
        need(self.select_fixed != "paper" or self.num_selected_blocks >= 3, "select_fixed",
             "paper needs num_selected_blocks >= 3")
        need(self.rope_theta >= 0 and (self.rope_theta == 0 or self.head_dim % 2 == 0),
             "rope_theta", "must be >= 0, and > 0 needs an even head_dim")
        need(self.vocab_size >= 0, "vocab_size", "must be >= 0")

    @classmethod
    def from_metadata(cls, meta):
        kw = {}
        for name, (typ, _) in OPTIONS.items():
            if name in meta:
                text = meta[name].strip()
                kw[name] = typ(float(text)) if typ is int and "." in text else typ(text)
        return cls(**kw)

    def to_metadata(self):
        return {name: repr(getattr(self, name)) if OPTIONS[name][0] is float
                else str(getattr(self, name)) for name in OPTIONS}


# ----------------------------------------------------------------------------------------
# Parameters (SPEC §7 names and shapes)

def param_shapes(cfg, with_lm=True):
    """Ordered [(name, shape)] of every parameter; with_lm=False leaves out embed and
    lm_head (what param_count counts)."""
    E, D, H, G, d, l = cfg.embed_dim, cfg.hidden_size, cfg.num_heads, cfg.G, cfg.head_dim, cfg.l
    V = cfg.vocab_size if with_lm else 0
    out = []
    if V:
        out.append(("embed.weight", (V, E)))
    if E != D:
        out += [("in_proj.weight", (D, E)), ("in_proj.bias", (D,))]
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        out += [(p + "attn_norm.weight", (D,)), (p + "attn_norm.bias", (D,))]
        for proj, rows in (("q_proj", H * d), ("k_proj", G * d), ("v_proj", G * d)):
            out += [(p + f"attn.{proj}.weight", (rows, D)), (p + f"attn.{proj}.bias", (rows,))]
        out += [(p + "attn.o_proj.weight", (D, H * d)), (p + "attn.o_proj.bias", (D,))]
        if cfg.gate == "static":
            out.append((p + "attn.gate", (3,)))
        else:
            out += [(p + "attn.gate_proj.weight", (3 * H, D)), (p + "attn.gate_proj.bias", (3 * H,))]
        for kv in ("compress_k", "compress_v"):
            c = p + f"attn.{kv}."
            if cfg.compress == "conv":
                out.append((c + "weight", (G, l, d)))
            elif cfg.compress == "mlp":
                out += [(c + "pos", (l, d)), (c + "fc1.weight", (d, l * d)), (c + "fc1.bias", (d,)),
                        (c + "fc2.weight", (d, d)), (c + "fc2.bias", (d,))]
        out += [(p + "ffn_norm.weight", (D,)), (p + "ffn_norm.bias", (D,)),
                (p + "ffn.up.weight", (4 * D, D)), (p + "ffn.up.bias", (4 * D,)),
                (p + "ffn.down.weight", (D, 4 * D)), (p + "ffn.down.bias", (D,))]
    out += [("final_norm.weight", (D,)), ("final_norm.bias", (D,))]
    if V:
        out += [("lm_head.weight", (V, D)), ("lm_head.bias", (V,))]
    return out


def param_count(cfg):
    return sum(math.prod(shape) for _, shape in param_shapes(cfg, with_lm=False))


def random_params(cfg, seed=0, dtype=np.float32):
    """Random, non-zero weights of a plausible scale for every parameter (for tests)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in param_shapes(cfg):
        if name.endswith("norm.weight"):
            a = 1.0 + 0.2 * rng.standard_normal(shape)
        elif name == "embed.weight":
            a = rng.standard_normal(shape)
        elif name.endswith(".gate") or name.endswith(".pos"):
            a = 0.5 * rng.standard_normal(shape)
        elif name.endswith("compress_k.weight") or name.endswith("compress_v.weight"):
            a = (1.0 + 0.5 * rng.standard_normal(shape)) / shape[1]
        elif len(shape) == 2:
            limit = math.sqrt(6.0 / (shape[0] + shape[1]))
            a = rng.uniform(-limit, limit, shape)
        else:
            a = 0.1 * rng.standard_normal(shape)
        out[name] = a.astype(dtype)
    return out


def load_checkpoint(path, dtype=torch.float32):
    """Returns (cfg, {name: tensor}) with every SPEC §7 tensor checked by name and shape."""
    tensors, meta = read_safetensors(path)
    cfg = Config.from_metadata(meta)
    return cfg, params_from_numpy(cfg, tensors, dtype)


def params_from_numpy(cfg, tensors, dtype=torch.float32):
    expected = param_shapes(cfg)
    names = {n for n, _ in expected}
    extra = sorted(set(tensors) - names)
    if extra:
        raise ValueError(f"unexpected tensor(s) for this config: {', '.join(extra)}")
    params = {}
    for name, shape in expected:
        if name not in tensors:
            raise ValueError(f"missing tensor {name} {list(shape)}")
        if tuple(tensors[name].shape) != tuple(shape):
            raise ValueError(f"tensor {name}: shape {list(tensors[name].shape)}, "
                             f"expected {list(shape)}")
        params[name] = torch.tensor(np.asarray(tensors[name], dtype=np.float64), dtype=dtype)
    return params


# ----------------------------------------------------------------------------------------
# Building blocks

def linear(x, P, prefix):
    return x @ P[prefix + ".weight"].t() + P[prefix + ".bias"]


def layer_norm(x, P, prefix):
    return F.layer_norm(x, x.shape[-1:], P[prefix + ".weight"], P[prefix + ".bias"], eps=1e-5)


def gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))  # exact GELU


def rope(x, theta):
    """x [B,T,heads,d] -> rotated; pair (2i, 2i+1) of position t turns by t*theta^(-2i/d)."""
    T, d = x.shape[1], x.shape[3]
    i = torch.arange(d // 2, dtype=torch.float64)
    angle = torch.arange(T, dtype=torch.float64)[:, None] * theta ** (-2.0 * i / d)  # [T,d/2]
    cos = angle.cos().to(x.dtype)[None, :, None, :]
    sin = angle.sin().to(x.dtype)[None, :, None, :]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)


def masked_softmax(scores, mask):
    """Softmax over the last axis of the entries where mask is True; other entries get
    probability 0 and a row with no True entry is all 0 (SPEC §3: keys outside a path are
    left out, no -1e9 fill)."""
    s = scores.masked_fill(~mask, float("-inf"))
    row_max = s.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    e = torch.exp(s - row_max)  # exactly 0 (and 0 gradient) where masked
    total = e.sum(dim=-1, keepdim=True)
    return e / torch.where(total > 0, total, torch.ones_like(total))


def num_compressed(T, r, l):
    return (T - l) // r + 1 if T >= l else 0


def compression_windows(x, r, l):
    """x [B,T,G,d] -> [B,Tc,l,G,d]: window j holds positions j*r .. j*r+l-1."""
    Tc = num_compressed(x.shape[1], r, l)
    idx = torch.arange(Tc)[:, None] * r + torch.arange(l)[None, :]
    return x[:, idx]


def compress(x, mode, r, l, P=None, prefix=None):
    """SPEC §3.1: x [B,T,G,d] (rotated keys, or values) -> compressed [B,Tc,G,d]."""
    win = compression_windows(x, r, l)  # [B,Tc,l,G,d]
    if mode == "mean":
        return win.sum(dim=2) / l
    if mode == "conv":
        weight = P[prefix + ".weight"]  # [G,l,d]
        return (win * weight.permute(1, 0, 2)[None, None]).sum(dim=2)
    # mlp: vec index i*d + channel of (window + pos), shared by the kv heads
    B, Tc, _, G, d = win.shape
    z = (win + P[prefix + ".pos"][None, None, :, None, :]).permute(0, 1, 3, 2, 4)
    z = z.reshape(B, Tc, G, l * d)
    return linear(gelu(linear(z, P, prefix + ".fc1")), P, prefix + ".fc2")


# ----------------------------------------------------------------------------------------
# Block selection (SPEC §3.2), never differentiated

def block_scores(q, k, p_cmp, b, r, l, select_score):
    """Per kv head scores of every block for every query: [B,G,T,nb]."""
    B, T, H, d = q.shape
    G = k.shape[2]
    nb = (T + b - 1) // b
    pos = torch.arange(T)
    member = (pos[:, None] // b == torch.arange(nb)[None, :]).to(q.dtype)  # [T(key), nb]
    if select_score == "mean_key":
        # score_t(i) = sum over the group's heads h of q_{t,h} . mean{k_s: s in i, s <= t}
        causal = (pos[None, :] <= pos[:, None]).to(q.dtype)  # [T(query), T(key)]
        dots = torch.einsum("btgjd,bsgd->bgts", q.reshape(B, T, G, H // G, d), k)
        sums = (dots * causal) @ member
        counts = causal @ member
        return sums / counts.clamp(min=1.0)  # blocks with no visible key are not candidates
    # cmp_attn: sum of p_cmp over the compressed tokens whose span overlaps block i
    Tc = p_cmp.shape[-1]
    start = torch.arange(Tc)[:, None] * r
    first = torch.arange(nb)[None, :] * b
    overlap = ((start < first + b) & (start + l > first)).to(q.dtype)  # [Tc, nb]
    p_group = p_cmp.reshape(B, G, H // G, T, Tc).sum(dim=2)
    return p_group @ overlap


def top_blocks(scores, candidate, fixed, n):
    """scores [...,nb], candidate/fixed bool [...,nb] -> selected bool [...,nb]: the fixed
    blocks plus the n - |fixed| best other candidates; block j ranks above block i when
    score j > score i or they are equal and j < i. All candidates when there are <= n."""
    nb = scores.shape[-1]
    idx = torch.arange(nb)
    s_i, s_j = scores[..., :, None], scores[..., None, :]
    beats = (s_j > s_i) | ((s_j == s_i) & (idx[None, :] < idx[:, None]))  # [...,i,j]
    free = candidate & ~fixed
    rank = (beats & free[..., None, :]).sum(dim=-1)  # free candidates ranked above i
    slots = n - fixed.sum(dim=-1, keepdim=True)
    return fixed | (free & (rank < slots))


def select_blocks(q, k, p_cmp, b, r, l, n, select_score, select_fixed):
    """SPEC §3.2 -> selected bool [B,G,T,nb]."""
    with torch.no_grad():
        q, k, p_cmp = q.detach(), k.detach(), p_cmp.detach()
        T = q.shape[1]
        nb = (T + b - 1) // b
        scores = block_scores(q, k, p_cmp, b, r, l, select_score)
        current = (torch.arange(T) // b)[:, None]  # t // b
        blocks = torch.arange(nb)[None, :]
        candidate = blocks <= current  # [T, nb]: i*b <= t
        if select_fixed == "paper":
            fixed = candidate & ((blocks == 0) | (blocks == current) | (blocks == current - 1))
        else:
            fixed = torch.zeros_like(candidate)
        shape = scores.shape
        selected = torch.zeros(shape, dtype=torch.bool)
        chunk = max(1, (1 << 22) // max(1, shape[0] * shape[1] * nb * nb))  # bound memory
        for t0 in range(0, T, chunk):
            sl = slice(t0, t0 + chunk)
            selected[:, :, sl] = top_blocks(scores[:, :, sl], candidate[sl].expand_as(scores[:, :, sl]),
                                            fixed[sl].expand_as(scores[:, :, sl]), n)
        return selected


def indices_to_mask(block_indices, nb):
    """block_indices [B,T,G,n] (-1 unused) -> selected bool [B,G,T,nb]."""
    idx = torch.as_tensor(np.asarray(block_indices)).long()
    if idx.numel() and (idx.min() < -1 or idx.max() >= nb):
        raise ValueError(f"block_indices outside [-1, {nb})")
    onehot = idx[..., None] == torch.arange(nb)  # [B,T,G,n,nb]
    return onehot.any(dim=3).permute(0, 2, 1, 3)


def mask_to_indices(selected, n):
    """selected bool [B,G,T,nb] -> int32 [B,T,G,n], ascending block numbers, -1 padded."""
    B, G, T, nb = selected.shape
    out = np.full((B, T, G, n), -1, dtype=np.int32)
    sel = selected.permute(0, 2, 1, 3).numpy()
    for bi, t, g in np.ndindex(B, T, G):
        found = np.nonzero(sel[bi, t, g])[0][:n]
        out[bi, t, g, :len(found)] = found
    return out


# ----------------------------------------------------------------------------------------
# The three-path attention (SPEC §3, §6)

def nsa_core(q, k, v, kc, vc, gates, block_size, window_size, compression_ratio,
             compression_block, num_selected_blocks, select_score="mean_key",
             select_fixed="none", block_indices=None, scale=None, return_selection=False):
    """q [B,T,H,d] and k [B,T,G,d] already rotated, v [B,T,G,d], kc, vc [B,Tc,G,d]
    compressed, gates [B,T,H,3] (cmp, slc, win) -> o [B,T,H,d] (and the selection
    bool [B,G,T,nb] when return_selection)."""
    B, T, H, d = q.shape
    G = k.shape[2]
    b, w, r, l, n = (block_size, window_size, compression_ratio, compression_block,
                     num_selected_blocks)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    heads_per_kv = H // G  # query head h reads kv head h // heads_per_kv
    k_h, v_h = k.repeat_interleave(heads_per_kv, dim=2), v.repeat_interleave(heads_per_kv, dim=2)
    pos = torch.arange(T)
    causal = pos[None, :] <= pos[:, None]  # [T(query), T(key)]
    scores = torch.einsum("bthd,bshd->bhts", q, k_h) * scale

    # compressed path: token j is visible to query t when j*r + l - 1 <= t
    Tc = kc.shape[1]
    if Tc > 0:
        visible = (torch.arange(Tc) * r + l - 1)[None, :] <= pos[:, None]  # [T, Tc]
        kc_h = kc.repeat_interleave(heads_per_kv, dim=2)
        vc_h = vc.repeat_interleave(heads_per_kv, dim=2)
        p_cmp = masked_softmax(torch.einsum("bthd,bjhd->bhtj", q, kc_h) * scale, visible)
        o_cmp = torch.einsum("bhtj,bjhd->bthd", p_cmp, vc_h)
    else:
        p_cmp = q.new_zeros(B, H, T, 0)
        o_cmp = torch.zeros_like(q)

    # selected path
    nb = (T + b - 1) // b
    if block_indices is None:
        selected = select_blocks(q, k, p_cmp, b, r, l, n, select_score, select_fixed)
    else:
        selected = indices_to_mask(block_indices, nb)
    key_selected = selected.repeat_interleave(heads_per_kv, dim=1)[..., pos // b]  # [B,H,T,T]
    o_slc = torch.einsum("bhts,bshd->bthd", masked_softmax(scores, causal & key_selected), v_h)

    # sliding window: positions max(0, t-w+1) .. t
    window = causal & (pos[None, :] > pos[:, None] - w)
    o_win = torch.einsum("bhts,bshd->bthd", masked_softmax(scores, window), v_h)

    o = gates[..., 0:1] * o_cmp + gates[..., 1:2] * o_slc + gates[..., 2:3] * o_win
    return (o, selected) if return_selection else o


def nsa_attention(q, k, v, gates, block_size, window_size, compression_ratio,
                  compression_block=None, num_selected_blocks=1, select_score="mean_key",
                  select_fixed="none", block_indices=None, scale=None, return_selection=False):
    """The public op of SPEC §6: mean compression of k and v, then the three paths."""
    l = compression_block or compression_ratio
    kc = compress(k, "mean", compression_ratio, l)
    vc = compress(v, "mean", compression_ratio, l)
    return nsa_core(q, k, v, kc, vc, gates, block_size, window_size, compression_ratio, l,
                    num_selected_blocks, select_score, select_fixed, block_indices, scale,
                    return_selection)


# ----------------------------------------------------------------------------------------
# The model (SPEC §2, §3, §5); dropout is off (inference and gradient checks)

def attention_layer(P, cfg, i, z):
    """z [B,T,D] (normalised) -> [B,T,D]."""
    B, T, _ = z.shape
    H, G, d = cfg.num_heads, cfg.G, cfg.head_dim
    pre = f"layers.{i}.attn."
    q = linear(z, P, pre + "q_proj").reshape(B, T, H, d)
    k = linear(z, P, pre + "k_proj").reshape(B, T, G, d)
    v = linear(z, P, pre + "v_proj").reshape(B, T, G, d)
    if cfg.rope_theta > 0:
        q, k = rope(q, cfg.rope_theta), rope(k, cfg.rope_theta)
    kc = compress(k, cfg.compress, cfg.compression_ratio, cfg.l, P, pre + "compress_k")
    vc = compress(v, cfg.compress, cfg.compression_ratio, cfg.l, P, pre + "compress_v")
    if cfg.gate == "static":
        gates = torch.softmax(P[pre + "gate"], dim=0).expand(B, T, H, 3)
    else:
        gates = torch.sigmoid(linear(z, P, pre + "gate_proj")).reshape(B, T, H, 3)
    o = nsa_core(q, k, v, kc, vc, gates, cfg.block_size, cfg.window_size,
                 cfg.compression_ratio, cfg.l, cfg.num_selected_blocks, cfg.select_score,
                 cfg.select_fixed)
    return linear(o.reshape(B, T, H * d), P, pre + "o_proj")


def block_forward(P, cfg, i, x):
    h = x + attention_layer(P, cfg, i, layer_norm(x, P, f"layers.{i}.attn_norm"))
    up = linear(layer_norm(h, P, f"layers.{i}.ffn_norm"), P, f"layers.{i}.ffn.up")
    return h + linear(gelu(up), P, f"layers.{i}.ffn.down")


def model_forward(P, cfg, x, all_positions=False):
    """x [B,T,E] -> [B,D] (last position) or [B,T,D]."""
    if cfg.embed_dim != cfg.hidden_size:
        x = linear(x, P, "in_proj")
    for i in range(cfg.num_layers):
        x = block_forward(P, cfg, i, x)
    x = layer_norm(x, P, "final_norm")
    return x if all_positions else x[:, -1]


def lm_logits(P, cfg, tokens):
    """tokens [B,T] int -> logits [B,T,V]."""
    x = P["embed.weight"][torch.as_tensor(np.asarray(tokens)).long()]
    return linear(model_forward(P, cfg, x, all_positions=True), P, "lm_head")


def lm_loss(P, cfg, tokens):
    """Mean cross-entropy of predicting tokens[:, t+1] from position t, over B*(T-1)."""
    tokens = torch.as_tensor(np.asarray(tokens)).long()
    if tokens.shape[1] < 2:
        raise ValueError("the loss needs T >= 2")
    logits = lm_logits(P, cfg, tokens)
    V = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, V), tokens[:, 1:].reshape(-1))


# ----------------------------------------------------------------------------------------
# Command line

def _dtype(args):
    return torch.float64 if args.f64 else torch.float32


def cmd_forward(args):
    cfg, P = load_checkpoint(args.ckpt, _dtype(args))
    x = np.load(args.input)
    with torch.no_grad():
        if x.dtype.kind in "iu":
            if cfg.vocab_size == 0:
                raise ValueError("integer input needs a checkpoint with vocab_size > 0")
            if x.ndim != 2 or x.min() < 0 or x.max() >= cfg.vocab_size:
                raise ValueError(f"tokens must be [B,T] in [0,{cfg.vocab_size})")
            y = lm_logits(P, cfg, x)
        else:
            if x.ndim != 3 or x.shape[2] != cfg.embed_dim:
                raise ValueError(f"input must be [B,T,{cfg.embed_dim}], got {list(x.shape)}")
            y = model_forward(P, cfg, torch.tensor(x, dtype=_dtype(args)), args.all)
    np.save(args.output, y.numpy())


def cmd_grad(args):
    cfg, P = load_checkpoint(args.ckpt, _dtype(args))
    if cfg.vocab_size == 0:
        raise ValueError("grad needs a checkpoint with vocab_size > 0")
    tokens = np.load(args.tokens)
    if tokens.dtype.kind not in "iu" or tokens.ndim != 2:
        raise ValueError("tokens must be an integer array [B,T]")
    for p in P.values():
        p.requires_grad_(True)
    loss = lm_loss(P, cfg, tokens)
    loss.backward()
    meta = cfg.to_metadata()
    meta["loss"] = repr(loss.item())
    # a parameter the loss does not reach (compression weights when T < l) has gradient 0
    grads = {n: P[n].grad if P[n].grad is not None else torch.zeros_like(P[n])
             for n, _ in param_shapes(cfg)}
    write_safetensors(args.output, grads, meta)


def cmd_attn(args):
    dtype = _dtype(args)
    q, k, v, gates = (torch.tensor(np.load(p), dtype=dtype) for p in
                      (args.q, args.k, args.v, args.gates))
    idx = np.load(args.block_indices) if args.block_indices else None
    grads = args.dout is not None
    for t in (q, k, v, gates):
        t.requires_grad_(grads)
    o, selected = nsa_attention(q, k, v, gates, args.block_size, args.window_size,
                                args.compression_ratio, args.compression_block,
                                args.num_selected_blocks, args.select_score, args.select_fixed,
                                idx, args.scale, return_selection=True)
    np.save(args.output, o.detach().numpy())
    if args.indices_out:
        np.save(args.indices_out, mask_to_indices(selected, args.num_selected_blocks))
    if grads:
        o.backward(torch.tensor(np.load(args.dout), dtype=dtype))
        write_safetensors(args.grads_out, {"dq": q.grad, "dk": k.grad, "dv": v.grad,
                                           "dgates": gates.grad})


def main(argv=None):
    ap = argparse.ArgumentParser(prog="torch_nsa.py", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("forward")
    f.add_argument("ckpt"), f.add_argument("input"), f.add_argument("output")
    f.add_argument("--all", action="store_true")
    g = sub.add_parser("grad")
    g.add_argument("ckpt"), g.add_argument("tokens"), g.add_argument("output")
    a = sub.add_parser("attn")
    for name in ("q", "k", "v", "gates", "output"):
        a.add_argument(name)
    for name in ("block-size", "window-size", "compression-ratio", "num-selected-blocks"):
        a.add_argument("--" + name, type=int, required=True)
    a.add_argument("--compression-block", type=int, default=0)
    a.add_argument("--select-score", choices=ENUMS["select_score"], default="mean_key")
    a.add_argument("--select-fixed", choices=ENUMS["select_fixed"], default="none")
    a.add_argument("--scale", type=float, default=None)
    a.add_argument("--block-indices"), a.add_argument("--indices-out")
    a.add_argument("--dout"), a.add_argument("--grads-out")
    for p in (f, g, a):
        p.add_argument("--f64", action="store_true", help="compute (and write) in float64")
    args = ap.parse_args(argv)
    if args.cmd == "attn" and (args.dout is None) != (args.grads_out is None):
        ap.error("--dout and --grads-out go together")
    try:
        {"forward": cmd_forward, "grad": cmd_grad, "attn": cmd_attn}[args.cmd](args)
    except (ValueError, OSError, KeyError) as e:
        print(f"torch_nsa: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
