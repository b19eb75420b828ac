"""The NFERD network: frozen teacher -> OCBE -> reverse student, with normal feature banks fused in.

``ModelConfig`` holds every architectural choice (JSON-serialisable, saved with checkpoints).
With ``bank=False`` and ``fusion="none"`` the model is exactly RD4AD: same modules, same
outputs, so NFERD's gain is measured in one code base.

Bank readings (DESIGN-NOTES.md, docs/banks.md) are presets of three switches, ``key`` (which
map queries the bank), ``placement`` (where the recalled map is fused) and ``granularity``
(whole maps or positions are recalled):

=====  ==========  ==========  ===========  ============================================
name   key         placement   granularity  meaning
=====  ==========  ==========  ===========  ============================================
A      student     input       image        paper wording: projected bank fused before decoder stages
B      student     output      image        fused with the student's stage outputs, in teacher space
C      teacher     input       image        input's teacher features choose the maps; fused as A
D      teacher     output      image        input's teacher features choose the maps; fused as B
E      teacher     input       patch        each position recalls its K nearest normal positions; fused as A
F      teacher     output      patch        as E, fused as B
G      student     input       patch        as E, but the banks of ``rebuild_key_stages`` (default:
                                            layer1) are searched by the student's own rebuild of
                                            the next coarser stage
=====  ==========  ==========  ===========  ============================================

In G the student's map entering the stage that rebuilds stage i IS its rebuild of stage i + 1,
in teacher space, so it can query the bank positions by their teacher stage-(i + 1) features
(reading A's query, made comparable); the other banks (always layer3's, which the OCBE output
meets) stay teacher-keyed as in E. A teacher key hands a defect back when a fine defect feature
has a normal twin; the student's rebuild, trained on normal images only, asks for what should
be there instead.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn

from .anomaly_map import COMBINES, GaussianBlur, anomaly_map, image_score
from .bank import NormalFeatureBank, Recall
from .decoder import DeBasicBlock, DeBottleneck, ReverseDecoder
from .hafm import FUSIONS, make_fusion
from .loss import LOSSES
from .ocbe import OCBE
from .resnet import RESNET_SPECS, BasicBlock, Bottleneck
from .teacher import Teacher, build_teacher

READINGS: dict[str, tuple[str, str, str]] = {
    "A": ("student", "input", "image"),
    "B": ("student", "output", "image"),
    "C": ("teacher", "input", "image"),
    "D": ("teacher", "output", "image"),
    "E": ("teacher", "input", "patch"),
    "F": ("teacher", "output", "patch"),
    "G": ("student", "input", "patch"),
}


def config_from_dict(cls: type, d: dict[str, Any], what: str) -> Any:
    """Build a config dataclass from JSON, naming unknown keys instead of a TypeError."""
    unknown = sorted(set(d) - {f.name for f in fields(cls)})
    if unknown:
        raise ValueError(f"unknown {what} option(s): {', '.join(unknown)}")
    return cls(**d)


@dataclass
class ModelConfig:
    """Architecture and scoring options; defaults are the project's measured choices."""

    teacher: str = "wide_resnet50_2"
    image_size: int = 256
    bank: bool = True
    reading: str = "E"
    n_bank: int = 64
    top_k: int = 4
    temperature: float = 0.01
    weighting: str = "softmax"
    patch_limit: int = 16384  # patch readings: bank positions searched per bank
    patch_sampling: str = "random"  # which positions: 'coreset' (greedy k-centre) or 'random'
    fusion: str = "hafm"
    loss: str = "flat"
    map_combine: str = "sum"
    blur_sigma: float = 4.0
    student_act: str = "auto"  # 'relu' | 'linear' | 'auto' (follow the teacher's stage outputs)
    student_width: int | None = None  # bottleneck width_per_group; None = 128 (WRN50-2 student)
    bank_stages: tuple[int, ...] = (1, 2, 3)  # teacher stages (1 = finest) that get a bank and its fusion
    rebuild_key_stages: tuple[int, ...] = (1,)  # reading G: banks searched by the student's coarser rebuild

    def __post_init__(self) -> None:
        if self.reading not in READINGS:
            raise ValueError(f"unknown bank reading '{self.reading}'; choose one of: {', '.join(READINGS)}")
        if self.fusion not in FUSIONS:
            raise ValueError(f"unknown fusion '{self.fusion}'; choose one of: {', '.join(FUSIONS)}")
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss '{self.loss}'; choose one of: {', '.join(LOSSES)}")
        if self.map_combine not in COMBINES:
            raise ValueError(f"unknown map combine '{self.map_combine}'; choose one of: {', '.join(COMBINES)}")
        if self.image_size % 32 or self.image_size < 64:
            raise ValueError(f"image size must be a multiple of 32 and at least 64, got {self.image_size}")
        if self.bank and not 1 <= self.top_k <= self.n_bank - 1:
            raise ValueError(f"top_k must be between 1 and n_bank - 1 (one bank map is masked out for its own "
                             f"image during training); got top_k={self.top_k}, n_bank={self.n_bank}")
        if not self.bank and self.fusion != "none":
            raise ValueError(f"fusion '{self.fusion}' needs the bank: use --bank on, or --fusion none for RD4AD")
        self.bank_stages = tuple(sorted({int(i) for i in self.bank_stages}))  # JSON gives a list
        if not self.bank_stages or not set(self.bank_stages) <= {1, 2, 3}:
            raise ValueError(f"bank stages must be a non-empty subset of 1, 2, 3 (teacher stages, 1 = finest); "
                             f"got {self.bank_stages}")
        self.rebuild_key_stages = tuple(sorted({int(i) for i in self.rebuild_key_stages}))
        if not self.rebuild_key_stages or not set(self.rebuild_key_stages) <= {1, 2}:
            raise ValueError(f"rebuild key stages must be a non-empty subset of 1, 2 (stage 3 has no coarser "
                             f"rebuild to search by); got {self.rebuild_key_stages}")
        if self.student_act not in ("auto", "relu", "linear"):
            raise ValueError(f"student_act must be auto, relu or linear, got '{self.student_act}'")

    @property
    def key(self) -> str:
        return READINGS[self.reading][0]

    @property
    def placement(self) -> str:
        return READINGS[self.reading][1]

    @property
    def granularity(self) -> str:
        return READINGS[self.reading][2]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["bank_stages"] = list(self.bank_stages)  # the JSON form, so saved and live configs compare equal
        d["rebuild_key_stages"] = list(self.rebuild_key_stages)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        return config_from_dict(cls, d, "model")


@dataclass(frozen=True)
class StudentSpec:
    """Sizes of OCBE and decoder, derived from the teacher family."""

    enc_block: type[BasicBlock] | type[Bottleneck]
    dec_block: type[DeBasicBlock] | type[DeBottleneck]
    embed_planes: int
    ocbe_blocks: int
    layers: tuple[int, int, int]
    width: int


def student_spec(config: ModelConfig, stage_channels: tuple[int, int, int]) -> StudentSpec:
    """RD4AD's student for ResNets (WRN50-2-sized for every bottleneck teacher by default);
    a basic-block student sized from the stage channels for EfficientNet-Lite."""
    spec = RESNET_SPECS.get(config.teacher)
    if spec is not None and spec.block is Bottleneck:
        return StudentSpec(Bottleneck, DeBottleneck, 512, 3, (3, 4, 6), config.student_width or 128)
    if spec is not None:  # resnet18 / resnet34
        layers = (2, 2, 2) if spec.layers[0] == 2 else (3, 4, 6)
        return StudentSpec(BasicBlock, DeBasicBlock, 512, layers[0], layers, 64)
    return StudentSpec(BasicBlock, DeBasicBlock, 2 * stage_channels[2], 2, (2, 2, 2), 64)


class NFERD(nn.Module):
    """Teacher, OCBE, reverse student, three normal feature banks and their fusion modules."""

    def __init__(self, config: ModelConfig, teacher: Teacher | None = None,
                 teacher_weights: str | None = None) -> None:
        super().__init__()
        self.config = config
        self.teacher = teacher if teacher is not None else build_teacher(config.teacher, teacher_weights)
        c = self.teacher.stage_channels
        spec = student_spec(config, c)
        self.ocbe = OCBE(c, spec.enc_block, spec.embed_planes, spec.ocbe_blocks, spec.width)
        final_relu = self.teacher.nonnegative if config.student_act == "auto" else config.student_act == "relu"
        self.decoder = ReverseDecoder(self.ocbe.out_channels, c, spec.dec_block, spec.layers, spec.width, final_relu)
        s = config.image_size
        stage_sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]
        if config.placement == "input":  # bank i meets the map entering the stage that rebuilds stage i
            targets = [(c[1], stage_sizes[1]), (c[2], stage_sizes[2]), (self.ocbe.out_channels, (s // 32, s // 32))]
        else:  # bank i meets the student's output for stage i: same space, no projection
            targets = [(c[i], stage_sizes[i]) for i in range(3)]
        # Keyed "0".."2" by teacher stage (state-dict keys banks.<i>.*); a stage left out of
        # bank_stages has no bank and no fusion: the student passes through as in RD4AD.
        self.banks = nn.ModuleDict()
        banked = [i for i in range(3) if config.bank and i + 1 in config.bank_stages]
        project = config.placement == "input"
        for i in banked:
            rebuild_key = self.student_keyed_patches and i + 1 in config.rebuild_key_stages
            self.banks[str(i)] = NormalFeatureBank(
                config.n_bank, c[i], stage_sizes[i], out_channels=targets[i][0] if project else None,
                out_size=targets[i][1], top_k=config.top_k, temperature=config.temperature,
                weighting=config.weighting, raw_keys=config.key == "teacher" or self.student_keyed_patches,
                granularity=config.granularity, patch_limit=config.patch_limit,
                patch_sampling=config.patch_sampling, key_channels=c[i + 1] if rebuild_key else None)
        self.fusions = nn.ModuleList([make_fusion(config.fusion if i in banked else "none", targets[i][0])
                                      for i in range(3)])
        self.blur = GaussianBlur(config.blur_sigma)
        self.last_recalls: list[Recall | None] = [None, None, None]

    # ----------------------------------------------------------------- banks
    @property
    def student_keyed_patches(self) -> bool:
        """Reading G: student-keyed patch recall (bank positions searched by the next coarser stage)."""
        return self.config.key == "student" and self.config.granularity == "patch"

    @torch.no_grad()
    def fill_banks(self, teacher_maps: list[Tensor], ids: Tensor) -> None:
        """Store N teacher maps per stage (list of three N x C x H x W tensors) and their image ids."""
        for i, bank in self.banks.items():
            dev = bank.maps.device
            key_maps = teacher_maps[int(i) + 1].to(dev) if bank.separate_keys else None
            bank.fill(teacher_maps[int(i)].to(dev), ids.to(bank.ids.device), key_maps)

    def _fuse(self, i: int, x: Tensor, teacher_feats: list[Tensor], exclude_ids: Tensor | None) -> Tensor:
        if str(i) not in self.banks:
            return self.fusions[i](x)
        bank = self.banks[str(i)]
        shortlist = None
        if bank.separate_keys:
            query = x.detach()  # the student's rebuild of stage i + 1: a lookup, not a path for gradients
            if exclude_ids is not None:  # training: rerank the teacher's fixed shortlist, not a full search
                shortlist = teacher_feats[i + 1]
        elif bank.raw_keys:  # teacher-keyed: the input's own teacher map of this stage
            query = teacher_feats[i]
        else:
            query = x
        recall = bank(query, exclude_ids, shortlist)
        self.last_recalls[i] = Recall(*(t.detach() for t in (recall.value, recall.similarity, recall.indices,
                                                              recall.weights)))  # for diagnostics only
        return self.fusions[i](x, recall.value.to(x.dtype))

    # --------------------------------------------------------------- forward
    def student_features(self, teacher_feats: list[Tensor], exclude_ids: Tensor | None = None) -> list[Tensor]:
        """The student's three maps, in teacher order, from the teacher's three maps.

        ``exclude_ids`` (training only): dataset indices of the batch, masked out of the banks.
        """
        x = self.ocbe(teacher_feats)
        outs: list[Tensor] = [x, x, x]
        for j, stage in enumerate(self.decoder.stages):
            i = 2 - j
            if self.config.placement == "input":
                x = self._fuse(i, x, teacher_feats, exclude_ids)
            x = stage(x)
            if self.config.placement == "output":
                x = self._fuse(i, x, teacher_feats, exclude_ids)
            outs[i] = x
        return outs

    def forward(self, images: Tensor, exclude_ids: Tensor | None = None,
                teacher_feats: list[Tensor] | None = None) -> tuple[list[Tensor], list[Tensor]]:
        """Teacher and student maps. Pass cached ``teacher_feats`` to skip the teacher."""
        t = teacher_feats if teacher_feats is not None else self.teacher(images)
        return t, self.student_features(t, exclude_ids)

    def anomaly_maps(self, teacher_feats: list[Tensor], student_feats: list[Tensor],
                     size: tuple[int, int] | None = None) -> tuple[Tensor, Tensor]:
        """Blurred anomaly maps (B x 1 x H x W) and image scores (B) from both feature lists."""
        size = size or (self.config.image_size, self.config.image_size)
        maps = self.blur(anomaly_map(teacher_feats, student_feats, size, self.config.map_combine))
        return maps, image_score(maps)

    @torch.no_grad()
    def predict(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Images in [0, 1] (B x 3 x S x S) -> blurred anomaly maps and image scores."""
        t, s = self(images)
        return self.anomaly_maps(t, s, tuple(images.shape[-2:]))

    # ---------------------------------------------------------------- counts
    def param_counts(self) -> dict[str, int]:
        def n(m: nn.Module) -> int:
            return sum(p.numel() for p in m.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return {"teacher": n(self.teacher), "ocbe": n(self.ocbe), "decoder": n(self.decoder),
                "bank": n(self.banks), "fusion": n(self.fusions), "trainable": trainable,
                "bank_buffers": sum(b.maps.numel() + (b.search_keys.numel() if b.separate_keys else 0)
                                    for b in self.banks.values())}
