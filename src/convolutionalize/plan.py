"""HeadPlan: the framework-neutral description of a classifier's head.

Analysis (a framework adapter's ``find_head``) produces a plan; rewriting (the same
adapter's ``rewrite``) consumes it; ``inspect``, geometry and FLOP estimates read it.
A plan names the feature map where the head starts and lists, in graph order, what
happens to each head operation when the head is made convolutional.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

__all__ = ["FeatureMap", "HeadPlan", "HeadStep", "StepOp"]

# words in a kept step's detail that mark a layer which is the identity in inference
PASSTHROUGH = ("dropout", "identity", "gaussiannoise", "activityregularization")

StepOp = Literal[
    "global_pool",  # global avg/max pool -> stride-1 window pool, dropped, or kept (by pool mode)
    "adaptive_pool",  # AdaptiveAvgPool2d(k) before a flatten -> identity or the fixed pool it equals
    "flatten",  # flatten / view / reshape / squeeze to a vector -> removed, the map stays 4-D
    "linear",  # Linear/Dense/Gemm -> Conv (kernel = flattened map size, or 1x1)
    "batchnorm",  # BatchNorm over features -> per-channel BatchNorm over the map
    "layernorm",  # LayerNorm over features -> LayerNorm over channels at each location
    "softmax",  # softmax / log-softmax over features -> over channels
    "concat",  # concatenation of feature vectors -> of maps along channels
    "reshape",  # a reshape of feature vectors that moves no value ((N, D) <-> (N, D, 1, 1)) -> removed
    "keep",  # elementwise or per-location operation: unchanged
]


@dataclass(frozen=True)
class FeatureMap:
    """The last spatial map before the head, at the native input size.

    ``layout`` names the tensor's axes in order: ``"NCHW"``, ``"NHWC"``, or any other
    order a model permutes its map into before the flatten (``"NWHC"``, ``"NCWH"``).
    """

    node: str
    channels: int
    size: tuple[int, int]
    layout: str = "NCHW"


@dataclass(frozen=True)
class HeadStep:
    """One head operation and what the conversion does with it.

    ``kernel`` is set for ``linear`` steps (the conv kernel size), ``reduce`` for pools
    (``"avg"`` or ``"max"``), ``pool_to`` for adaptive pools (their output size).
    """

    node: str
    op: StepOp
    detail: str
    kernel: tuple[int, int] | None = None
    reduce: Literal["avg", "max"] | None = None
    pool_to: tuple[int, int] | None = None

    @property
    def passthrough(self) -> bool:
        """A kept step that passes values through unchanged in inference (dropout, identity,
        noise layers): a head of such steps, linears and average pools stays affine."""
        return self.op == "keep" and any(word in self.detail.lower() for word in PASSTHROUGH)


@dataclass(frozen=True)
class HeadPlan:
    """Everything the rewrite needs to know, and nothing framework-specific."""

    framework: str
    input_size: tuple[int, int]
    in_channels: int
    feature: FeatureMap
    steps: tuple[HeadStep, ...]
    outputs: tuple[str, ...] = ()  # the head's output nodes (several for multi-output heads)
    capture: str = ""  # how the graph was obtained (e.g. "torch.fx", "torch.export")

    @property
    def global_pooling(self) -> bool:
        """True when the head averages or maxes away the whole feature map (a GAP head)."""
        return any(step.op == "global_pool" for step in self.steps)

    @property
    def adaptive_pool(self) -> HeadStep | None:
        return next((s for s in self.steps if s.op == "adaptive_pool"), None)

    def steps_of(self, op: StepOp) -> list[HeadStep]:
        return [step for step in self.steps if step.op == op]

    @property
    def affine(self) -> bool:
        """True when the head is an affine map of the averaged features (no max pool, no
        nonlinearity): the mean of its ``pool="none"`` map then equals the original logits."""
        ops = ("global_pool", "flatten", "reshape", "linear", "batchnorm")
        return (all(s.op in ops or s.passthrough for s in self.steps)
                and all(s.reduce != "max" for s in self.steps_of("global_pool")))

    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON-ready data (saved beside a converted model's weights)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HeadPlan:
        """The plan :meth:`to_dict` gave."""
        f = data["feature"]
        steps = tuple(HeadStep(**{**s, "kernel": tuple(s["kernel"]) if s.get("kernel") else None,
                                  "pool_to": tuple(s["pool_to"]) if s.get("pool_to") else None})
                      for s in data["steps"])
        return cls(data["framework"], tuple(data["input_size"]), data["in_channels"],
                   FeatureMap(f["node"], f["channels"], tuple(f["size"]), f["layout"]), steps,
                   outputs=tuple(data.get("outputs", ())), capture=data.get("capture", ""))

    def describe(self) -> str:
        """A human-readable table of the head (used by ``convolutionalize inspect``)."""
        f = self.feature
        lines = [
            f"feature map: '{f.node}' {f.channels}x{f.size[0]}x{f.size[1]} ({f.layout}) "
            f"at input {self.in_channels}x{self.input_size[0]}x{self.input_size[1]}",
        ]
        if self.capture:
            lines.append(f"capture: {self.capture}")
        if len(self.outputs) > 1:
            lines.append(f"outputs: {len(self.outputs)} maps on one geometry ({', '.join(self.outputs)})")
        lines.append("head:")
        width = max((len(step.node) for step in self.steps), default=0)
        lines += [f"  {step.node:<{width}}  {step.op:<13}  {step.detail}" for step in self.steps]
        return "\n".join(lines)
