"""The pruning methods: one registry that every stage reads (calibrate builds recipes from it, the exporter picks
its in-graph selection from it, the runtime and the trade-off study list and label rows from it).

A method is a *schedule* (how many visual tokens go where) and a *selection* (which ones, in the graph):

| schedule | where tokens go | recipe from |
|---|---|---|
| `searched` | per-layer counts inside the LLM | FitPrune's binary search on calibration data |
| `fitprune_counts` | FitPrune's per-layer counts | the FitPrune recipe at the same budget (calibrated) |
| `one_layer` | all at once, after layer 1's attention (before layer 2; AdaptPrune: after layer 1) | the FLOPs budget alone |
| `pre_llm` | before the first layer: the image span itself shrinks | the FLOPs budget alone |

Every budget is the same visual-only FLOPs reduction (calibrate/flops.py), so every row of a table compares
like with like. Selections are functions of `exporter/selection.py` (named here, imported lazily: the registry
sits below every stage). `needs_attention` says whether the selection reads attention probabilities: the
others work with fused attention kernels. `attention_rows` says which rows: "all" (FitPrune's terms read every
row from the image on, so that layer stays eager) or "last" (FastV: one row, computed next to fused attention).
`cut_after` says where the tokens leave the pruning layer: after its attention (the default: they skip its
output projection and MLP, which only fed themselves) or after the whole layer (AdaptPrune: its selection reads
the next layer's keys of this layer's output, so every token runs this layer's MLP; the FLOPs count says so).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from visprune.errors import ConfigError

Schedule = Literal["none", "searched", "fitprune_counts", "one_layer", "pre_llm"]


@dataclass(frozen=True)
class Method:
    name: str
    title: str
    schedule: Schedule
    selection: str  # a function of exporter/selection.py ("" for none)
    summary: str
    attention_rows: Literal["", "all", "last"] = ""  # probability rows the selection reads at its layer
    needs_seed: bool = False
    ablation: bool = False  # a FitPrune variant that isolates one of its parts (docs/tradeoff/)
    vision_score: bool = False  # the selection reads a score the vision graph computes (`image_scores`)
    reads_hidden: bool = False  # an in-LLM selection reads the layer's normalized input (otherwise not computed)
    cut_after: Literal["attention", "layer"] = "attention"  # where the removed tokens leave the pruning layer
    # the selection unrolls one graph step per kept token (or splits K in Python): K must be a constant, so on
    # LLaVA-NeXT only an `absolute` budget (calibrate/recipe.py), not a `ratio` one whose K follows N
    constant_keep: bool = False
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def needs_attention(self) -> bool:
        return bool(self.attention_rows)

    @property
    def needs_calibration(self) -> bool:
        return self.schedule in ("searched", "fitprune_counts")

    @property
    def cuts_after_layer(self) -> bool:
        """Whether the removed tokens run their pruning layer to its end (the FLOPs count's `after_layer`)."""
        return self.cut_after == "layer"

    @property
    def pre_llm(self) -> bool:
        return self.schedule == "pre_llm"


_ALL = (
    Method("none", "unpruned", "none", "", "no pruning: the baseline every row is compared with"),
    Method("fitprune", "FitPrune", "searched", "fitprune_product",
           "per-layer counts searched for the budget; score = self-attention x cross-attention, heads max",
           attention_rows="all"),
    Method("fastv", "FastV", "one_layer", "last_token",
           "one cut after layer 1; score = the last prompt token's attention, heads averaged", attention_rows="last"),
    Method("random", "FitPrune(Random)", "fitprune_counts", "random",
           "FitPrune's counts; a fixed seeded random score per image position", needs_seed=True),
    Method("dart", "DART", "one_layer", "dart",
           "one cut after layer 1; keep the tokens least similar to 8 pivots (largest key L1 norm)",
           params={"pivots": 8}, reads_hidden=True, constant_keep=True),
    Method("divprune", "DivPrune", "pre_llm", "divprune",
           "before the LLM; greedy max-min cosine diversity over the projector's features", constant_keep=True),
    Method("visionzip", "VisionZip (dominant)", "pre_llm", "visionzip",
           "before the LLM; the vision tower's [CLS] attention at the feature layer, heads summed (no merge)",
           vision_score=True),
    Method("adaptprune", "AdaptPrune", "one_layer", "adaptprune",
           "one cut before layer 2; soft NMS over the last token's attention x a centre prior, suppressing "
           "near neighbours on the grid with similar keys", attention_rows="last", cut_after="layer",
           params={"prior_sigma": 12.0, "distance_limit": 5.0, "distance_sigma": 1.5, "similarity_sigma": 0.05},
           constant_keep=True),
    Method("fitprune-self", "FitPrune, self term only", "fitprune_counts", "fitprune_self",
           "FitPrune's counts; score = self-attention term alone", attention_rows="all", ablation=True),
    Method("fitprune-cross", "FitPrune, cross term only", "fitprune_counts", "fitprune_cross",
           "FitPrune's counts; score = cross-attention term alone", attention_rows="all", ablation=True),
    Method("fitprune-headmean", "FitPrune, heads averaged", "fitprune_counts", "fitprune_head_mean",
           "FitPrune's counts; product score with heads averaged instead of max", attention_rows="all", ablation=True),
    Method("fitprune-lasttoken", "FitPrune counts, FastV score", "fitprune_counts", "last_token",
           "FitPrune's counts; FastV's last-token score", attention_rows="last", ablation=True),
    Method("fitprune-onelayer", "FitPrune score, one cut", "one_layer", "fitprune_product",
           "FastV's schedule (one cut after layer 1); FitPrune's product score", attention_rows="all", ablation=True),
)
METHODS: dict[str, Method] = {m.name: m for m in _ALL}
METHOD_NAMES = tuple(METHODS)
PRUNING_METHODS = tuple(name for name, m in METHODS.items() if m.schedule != "none")
MAIN_METHODS = tuple(name for name in PRUNING_METHODS if not METHODS[name].ablation)


def method(name: str) -> Method:
    """The registered method `name`, or a ConfigError listing the known ones."""
    if name not in METHODS:
        raise ConfigError(f"Unknown method {name!r}.", f"Use one of: {', '.join(PRUNING_METHODS)}.")
    return METHODS[name]
