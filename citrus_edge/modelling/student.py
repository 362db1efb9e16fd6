"""Build a distillation student from a teacher Citrus-V: depth and width pruning.

`make_student(teacher, spec)` returns an ordinary `CitrusV` of `compress.student_spec.
student_config(teacher.config, spec)` whose weights are taken from the teacher where shapes
allow: the kept LLM decoder layers (all their parameters), the embeddings, final norm and
lm_head; the kept vision blocks, the patch embedding and the merger; the kept Hiera blocks (each
stage's first ones), Hiera's patch and position embeddings, and all the rest of SAM2 (FPN neck,
prompt encoder, mask decoder) and the seg projector. `save_checkpoint` writes it like any
Citrus-V.

Parts the spec re-widens (`fresh_parts`) are initialised afresh instead: the whole vision tower
when its width or heads differ from the teacher's; SAM2's FPN neck, prompt encoder, mask
decoder (and the image-position and no-memory embeddings) and the seg projector's output layer
when the SAM2 hidden size differs; the mask decoder alone when only its MLP differs. A narrower
residual stream changes every matrix of the part and what each channel means, so a slice of the
teacher's tensors is not the teacher's function either (and choosing which embedding channels
to keep, Minitron's hidden-size pruning, would need an importance ranking across the whole
part); distillation then teaches the fresh part (`modelling.distill`: visual-token, adapted
feature and `[SEG]` terms). The fresh tensors are the student's own initialisation (transformers'
init of `CitrusV(cfg)`, seeded, under a forked RNG so the caller's random state is unchanged),
so a student is deterministic. Never mixed silently: every tensor is either the teacher's with
the same shape or belongs to a re-widened part; anything else raises RuntimeError.

MLP width pruning (Minitron style: rank channels by importance, keep the top ones, no search)
keeps, in each kept LLM layer, the intermediate channels with the largest importance: the mean
|act(gate) * up| of the channel on calibration batches when some are given (activation-based,
as Minitron), else a weight-based proxy ||down_proj[:, j]|| * ||gate_proj[j]|| *
||up_proj[j]||. Kept channels stay in the teacher's order. At the teacher's vision width the
vision blocks' SwiGLU MLPs and the patch merger's MLP are pruned the same way, by the weight-based
proxy (||down[:, j]|| * ||gate[j]|| * ||up[j]||; the merger: ||mlp.2[:, j]|| * ||mlp.0[j]||).

A narrower Hiera (`hiera-width`) is pruned too (`hiera_channels`), rather than re-initialised:
unlike the vision tower, Hiera's stages are separate residual streams joined by a projection at
each stage change, so a channel ranking per stage is local. A stage's residual channels are
ranked by activation, as Minitron ranks embedding channels: the mean |output| of the stage's
blocks on a few images (default: eight phantoms, `hiera_images`). Cosine similarity of the
demo model's SAM2 image embeddings to the teacher's on eight phantoms the ranking did not see,
three quarters of the channels kept: 0.83 by activation, 0.72-0.83 (mean 0.77) for six random
choices; a weight-based ranking (row and column norms of the matrices that write and read each
channel) scored below random (0.71 against 0.76, on other phantoms). At half width the
activation ranking (0.60) is no better than random (0.36-0.68): too few channels are left for
any choice to keep the function, and distillation has to rebuild it. Inside a block each head
keeps its query/key channels of largest ||q_j|| * ||k_j|| and value channels of largest
||v_j|| * ||proj[:, j]||, its queries rescaled by sqrt(kept/teacher head size) so that the
softmax's 1/sqrt(head size) keeps the logits' scale; each MLP keeps the hidden channels of
largest ||in_j|| * ||out[:, j]||. LayerNorm then normalises over fewer channels, which
distillation corrects.

Why not `modelopt.torch.prune`: its Minitron mode (`mcore_minitron`) prunes Megatron-Core GPT
and Mamba models only, and its other mode (`fastnas`) is an architecture search over
convolution/linear search spaces driven by a score function and fine-tuning; neither accepts
transformers' Qwen2.5-VL / SAM2 modules, and the depth pruning here (by the teacher's own
indexes, or by `layer_importance`) needs no search. The importance ranking and slicing it does
for MLPs are a few lines here.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

import torch

from citrus_edge.modelling.checkpoint import _parameters_on_meta
from citrus_edge.modelling.model import CitrusV

LLM_LAYER = re.compile(r"^mllm\.model\.language_model\.layers\.(\d+)\.(.*)$")
VISION_BLOCK = re.compile(r"^mllm\.model\.visual\.blocks\.(\d+)\.(.*)$")
HIERA_BLOCK = re.compile(
    r"^grounding_encoder\.sam2_model\.vision_encoder\.backbone\.blocks\.(\d+)\.(.*)$"
)
BACKBONE = "grounding_encoder.sam2_model.vision_encoder.backbone."
NECK_CONV = re.compile(
    r"^grounding_encoder\.sam2_model\.vision_encoder\.neck\.convs\.(\d+)\.weight$"
)
VISION_TOWER = "mllm.model.visual."
MERGER = VISION_TOWER + "merger."
_SAM = "grounding_encoder.sam2_model."
MASK_DECODER = _SAM + "mask_decoder."
# SAM2 at its hidden size: everything but the Hiera backbone.
SAM_PROMPT_SIDE = (
    _SAM + "vision_encoder.neck.",
    _SAM + "prompt_encoder.",
    MASK_DECODER,
    _SAM + "shared_image_embedding.",
    _SAM + "no_memory_embedding",
)
# The seg projector's layers that write the SAM2 prompt width, per `CitrusVConfig.projector`.
SEG_OUTPUT = {
    "mlp": ("seg_projector.2.",),
    "residual": ("seg_projector.mlp.2.", "seg_projector.skip."),
}

log = logging.getLogger(__name__)


def llm_layers(model: CitrusV) -> torch.nn.ModuleList:
    return model.mllm.model.language_model.layers


def swiglu_score(mlp: torch.nn.Module) -> torch.Tensor:
    """The weight-based importance of each intermediate channel of a SwiGLU MLP (module
    docstring): ||down_proj[:, j]|| * ||gate_proj[j]|| * ||up_proj[j]||."""
    with torch.no_grad():
        return (
            mlp.down_proj.weight.float().norm(dim=0)
            * mlp.gate_proj.weight.float().norm(dim=1)
            * mlp.up_proj.weight.float().norm(dim=1)
        )


def mlp_importance(
    teacher: CitrusV, batches: Iterable[dict] | None = None
) -> dict[int, torch.Tensor]:
    """Per LLM layer, one score per MLP intermediate channel (higher: more important).

    With `batches` (collated training batches, `train.collate`): mean |act(gate) * up| over
    the attended tokens (the down projection's input). Without: the weight-based proxy of the
    module docstring.
    """
    layers = llm_layers(teacher)
    if batches is None:
        return {i: swiglu_score(layer.mlp) for i, layer in enumerate(layers)}
    from citrus_edge.modelling.layer_importance import language_forward

    sums: dict[int, torch.Tensor] = {}
    count = [0]
    mask_holder: list[torch.Tensor] = []

    def hook(i: int):
        def fn(_module, args):
            x = args[0].float().abs()  # [B, S, I]
            m = mask_holder[0].to(x.dtype)[..., None]
            sums[i] = sums.get(i, 0) + (x * m).sum(dim=(0, 1))

        return fn

    handles = [
        layer.mlp.down_proj.register_forward_pre_hook(hook(i)) for i, layer in enumerate(layers)
    ]
    try:
        with torch.no_grad():
            for batch in batches:
                mask_holder[:] = [batch["attention_mask"]]
                language_forward(teacher, batch)
                count[0] += int(batch["attention_mask"].sum())
    finally:
        for h in handles:
            h.remove()
    return {i: s / max(1, count[0]) for i, s in sums.items()}


def _keep_top(score: torch.Tensor, n: int) -> torch.Tensor:
    """Indexes of the `n` highest scores, in increasing (the teacher's) order."""
    return score.topk(n).indices.sort().values


def vision_channels(teacher: CitrusV, student_cfg) -> dict[str, torch.Tensor]:
    """Channels a student at the teacher's vision width keeps, by the weight-based proxy
    (module docstring): "block.<i>" per teacher block whose SwiGLU MLP narrows, "merger" when
    the merger's MLP narrows. Empty when the tower is re-widened (fresh) or unchanged."""
    tv, sv = teacher.config.vision, student_cfg.vision
    if (tv.hidden_size, tv.num_heads) != (sv.hidden_size, sv.num_heads):
        return {}
    visual = teacher.mllm.model.visual
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        if sv.intermediate_size != tv.intermediate_size:
            for i, block in enumerate(visual.blocks):
                out[f"block.{i}"] = _keep_top(swiglu_score(block.mlp), sv.intermediate_size)
        if sv.merger_width != tv.merger_width:
            mlp = visual.merger.mlp
            score = mlp[2].weight.float().norm(dim=0) * mlp[0].weight.float().norm(dim=1)
            out["merger"] = _keep_top(score, sv.merger_width)
    return out


def _slice_vision(rest: str, value: torch.Tensor, idx: torch.Tensor | None):
    """The teacher tensor `value` (vision block MLP or merger MLP parameter `rest`) cut to the
    kept channels `idx` (rows of the widening layers, columns of the narrowing one)."""
    if idx is None:
        return value
    if rest in ("mlp.gate_proj.weight", "mlp.gate_proj.bias", "mlp.up_proj.weight",
                "mlp.up_proj.bias", "mlp.0.weight", "mlp.0.bias"):  # fmt: skip
        return value[idx]
    if rest in ("mlp.down_proj.weight", "mlp.2.weight"):
        return value[:, idx]
    return value


def _hiera_stages(s) -> list[int]:
    """The stage of each Hiera block of `s` (`Sam2Dims`)."""
    return [i for i, n in enumerate(s.blocks_per_stage) for _ in range(n)]


def hiera_images(cfg, n: int = 8) -> torch.Tensor:
    """SAM2 inputs [n, 3, S, S] of the first `n` phantoms (seeds 0..n-1), for `hiera_channels`."""
    from citrus_edge.calib_data.phantom import generate_phantom
    from citrus_edge.preprocess import sam_pixels

    def rgb(seed: int):  # a phantom is grey [H, W]; as `train.make_sample` feeds it
        return generate_phantom(seed).image[..., None].repeat(3, axis=-1)

    return torch.cat([torch.from_numpy(sam_pixels(rgb(i), cfg.preprocess)) for i in range(n)])


def hiera_channels(
    teacher: CitrusV, student_cfg, images: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Channels a narrower Hiera keeps (module docstring): "stage.<s>" (residual channels, by
    the mean |output| of the stage's blocks on `images`, default `hiera_images`), and per
    teacher block `b`, by weight-based proxies, "block.<b>.qk" / "block.<b>.v" (indexes into
    its [heads * head size] query/key and value channels) and "block.<b>.mlp". Empty when the
    student's stage widths are the teacher's."""
    ts, ss = teacher.config.sam2, student_cfg.sam2
    if ts.embed_dim_per_stage == ss.embed_dim_per_stage:
        return {}
    backbone = teacher.sam2.vision_encoder.backbone
    stages = _hiera_stages(ts)
    score = [torch.zeros(d) for d in ts.embed_dim_per_stage]

    def record(b: int):
        def fn(_module, _args, output):
            score[stages[b]] += output.detach().float().abs().mean(dim=(0, 1, 2)).cpu()

        return fn

    images = hiera_images(teacher.config) if images is None else images
    handles = [blk.register_forward_hook(record(b)) for b, blk in enumerate(backbone.blocks)]
    try:
        with torch.no_grad():
            param = next(teacher.parameters())
            for image in images:  # one at a time: Hiera-L's activations at 1024 px are large
                teacher.encode_image_sam(image[None].to(param.device, param.dtype))
    finally:
        for h in handles:
            h.remove()
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for b, block in enumerate(backbone.blocks):
            st = stages[b]
            heads = ts.heads_per_stage[st]
            hd = block.dim_out // heads
            kept_hd = ss.embed_dim_per_stage[st] // heads
            q, k, v = block.attn.qkv.weight.float().norm(dim=1).view(3, heads, hd)
            v = v * block.attn.proj.weight.float().norm(dim=0).view(heads, hd)
            base = torch.arange(heads)[:, None] * hd
            out[f"block.{b}.qk"] = (
                (q * k).topk(kept_hd, dim=1).indices.sort().values + base
            ).flatten()
            out[f"block.{b}.v"] = (v.topk(kept_hd, dim=1).indices.sort().values + base).flatten()
            hidden = block.mlp.proj_in.weight.shape[0]
            kept_hidden = int(ss.embed_dim_per_stage[st] * hidden / block.dim_out)
            mlp = block.mlp.proj_in.weight.float().norm(
                dim=1
            ) * block.mlp.proj_out.weight.float().norm(dim=0)
            out[f"block.{b}.mlp"] = _keep_top(mlp, kept_hidden)
    for st, d in enumerate(ss.embed_dim_per_stage):
        out[f"stage.{st}"] = _keep_top(score[st], d)
    return out


def _slice_hiera_block(rest: str, value: torch.Tensor, b: int, stages, ch):
    """Teacher Hiera block `b`'s parameter `rest` cut to the kept channels `ch`
    (`hiera_channels`); queries rescaled for the narrower heads (module docstring)."""
    st = stages[b]
    out_ch, in_ch = ch[f"stage.{st}"], ch[f"stage.{stages[b - 1] if b else 0}"]
    qk, v = ch[f"block.{b}.qk"], ch[f"block.{b}.v"]
    if rest in ("layer_norm1.weight", "layer_norm1.bias"):
        return value[in_ch]
    if rest in ("attn.qkv.weight", "attn.qkv.bias"):
        d = value.shape[0] // 3
        q_scale = (qk.numel() / d) ** 0.5  # sqrt(kept head size / teacher's): same for each head
        rows = torch.cat([value[qk] * q_scale, value[d + qk], value[2 * d + v]])
        return rows[:, in_ch] if rest.endswith("weight") else rows
    if rest == "attn.proj.weight":
        return value[out_ch][:, v]
    if rest == "proj.weight":
        return value[out_ch][:, in_ch]
    if rest == "mlp.proj_in.weight":
        return value[ch[f"block.{b}.mlp"]][:, out_ch]
    if rest == "mlp.proj_in.bias":
        return value[ch[f"block.{b}.mlp"]]
    if rest == "mlp.proj_out.weight":
        return value[out_ch][:, ch[f"block.{b}.mlp"]]
    # attn.proj.bias, proj.bias, mlp.proj_out.bias, layer_norm2.*: the stage's channels
    return value[out_ch]


def fresh_parts(teacher_cfg, student_cfg) -> tuple[str, ...]:
    """State-dict prefixes of the parts a student of `student_cfg` initialises afresh because
    their widths differ from `teacher_cfg`'s (module docstring); empty: all the teacher's."""
    t, s = teacher_cfg, student_cfg
    parts: list[str] = []
    tv, sv = t.vision, s.vision
    if (tv.hidden_size, tv.num_heads) != (sv.hidden_size, sv.num_heads):
        parts.append(VISION_TOWER)
    if t.sam2.hidden_size != s.sam2.hidden_size:
        parts.extend(SAM_PROMPT_SIDE)
        parts.extend(SEG_OUTPUT[s.projector])
    elif (t.sam2.decoder_mlp_dim, t.sam2.iou_head_hidden_dim) != (
        s.sam2.decoder_mlp_dim,
        s.sam2.iou_head_hidden_dim,
    ):
        parts.append(MASK_DECODER)
    return tuple(parts)


def make_student(
    teacher: CitrusV,
    spec,
    batches: Iterable[dict] | None = None,
    channels: dict[int, torch.Tensor] | None = None,
    seed: int = 0,
    images: torch.Tensor | None = None,
) -> CitrusV:
    """The student of `spec` (`compress.student_spec.StudentSpec`) with the teacher's weights
    where shapes allow and a fresh initialisation of the parts it re-widens (`fresh_parts`).

    `batches`: calibration batches for activation-based MLP channel importance (default:
    weight-based). `channels`: the MLP channels to keep per teacher layer index, overriding the
    importance ranking (e.g. a random choice, to compare). `seed`: of the fresh parts'
    initialisation. `images`: SAM2 inputs [N, 3, S, S] that rank a narrower Hiera's channels
    (`hiera_channels`; default eight phantoms). The teacher is not changed; the student holds
    copies in the teacher's dtype, in eval mode. Raises `StudentSpecError` for a spec that does
    not fit the teacher (before any copying).
    """
    # The spec's own methods: this package may not import the compress stage (folder cycle).
    tcfg = teacher.config
    cfg = spec.student_config(tcfg)
    layers = spec.llm_layers or tuple(range(tcfg.text.num_layers))
    blocks = spec.vision_blocks or tuple(range(tcfg.vision.depth))
    hiera = spec.hiera_kept(tcfg)
    width = cfg.text.intermediate_size
    keep_ch: dict[int, torch.Tensor] = {}
    if width != tcfg.text.intermediate_size:
        if channels is None:
            scores = mlp_importance(teacher, batches)
            channels = {i: scores[i].topk(width).indices for i in layers}
        for i in layers:
            idx = torch.as_tensor(channels[i]).sort().values
            if idx.numel() != width or idx.unique().numel() != width:
                raise ValueError(f"channels[{i}]: need {width} distinct channel indexes")
            keep_ch[i] = idx
    new_llm = {old: new for new, old in enumerate(layers)}
    new_vis = {old: new for new, old in enumerate(blocks)}
    new_hiera = {old: new for new, old in enumerate(hiera)}

    fresh = fresh_parts(tcfg, cfg)
    vis_ch = vision_channels(teacher, cfg)
    hiera_ch = hiera_channels(teacher, cfg, images)
    stages = _hiera_stages(tcfg.sam2)
    state = {}
    for key, value in teacher.state_dict().items():
        if key.startswith(fresh):
            continue
        if m := LLM_LAYER.match(key):
            old = int(m.group(1))
            if old not in new_llm:
                continue
            rest = m.group(2)
            if old in keep_ch and rest in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
                value = value[keep_ch[old]]
            elif old in keep_ch and rest == "mlp.down_proj.weight":
                value = value[:, keep_ch[old]]
            key = f"mllm.model.language_model.layers.{new_llm[old]}.{rest}"
        elif m := VISION_BLOCK.match(key):
            old = int(m.group(1))
            if old not in new_vis:
                continue
            value = _slice_vision(m.group(2), value, vis_ch.get(f"block.{old}"))
            key = f"mllm.model.visual.blocks.{new_vis[old]}.{m.group(2)}"
        elif key.startswith(MERGER):
            value = _slice_vision(key[len(MERGER) :], value, vis_ch.get("merger"))
        elif m := HIERA_BLOCK.match(key):
            old = int(m.group(1))
            if old not in new_hiera:
                continue
            if hiera_ch:
                value = _slice_hiera_block(m.group(2), value, old, stages, hiera_ch)
            key = (
                "grounding_encoder.sam2_model.vision_encoder.backbone.blocks."
                f"{new_hiera[old]}.{m.group(2)}"
            )
        elif hiera_ch and key.startswith(BACKBONE):
            # patch embedding rows, position tables' channels: stage 0's residual stream
            value = (
                value[:, hiera_ch["stage.0"]] if "pos_embed" in key else value[hiera_ch["stage.0"]]
            )
        elif hiera_ch and (m := NECK_CONV.match(key)):
            value = value[:, hiera_ch[f"stage.{3 - int(m.group(1))}"]]
        state[key] = value.detach().clone()

    if fresh:
        # The student's own initialisation, seeded, without touching the caller's RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            student = CitrusV(cfg)
        dtype = next(teacher.parameters()).dtype
        for key, value in student.state_dict().items():
            if key.startswith(fresh):
                state[key] = value.detach().to(dtype).clone()
        log.info("student %s: initialised afresh (re-widened): %s", cfg.name, ", ".join(fresh))
    else:
        with _parameters_on_meta():
            student = CitrusV(cfg)
    expected = student.state_dict()
    # Outside the re-widened parts every width is the teacher's (or its MLP slice), so each
    # tensor must fit its place exactly: the FPN neck reads the teacher's stage widths, the
    # mask decoder and the seg projector the SAM2 and LLM hidden sizes.
    wrong = [
        f"{k}: teacher {tuple(v.shape)}, student {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if wrong or missing or unexpected:
        raise RuntimeError(
            f"student {cfg.name}: teacher weights do not fit (shape {wrong[:5]}, missing "
            f"{missing[:5]}, unexpected {unexpected[:5]})"
        )
    student.load_state_dict(state, strict=True, assign=True)
    if cfg.text.tie_word_embeddings:
        student.mllm.tie_weights()
    return student.eval()


def param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
