"""Local regrouping of pixels into channels (space-to-depth), read as the convolution it is.

``x.view(N, C, H/k, k, W/k, k).permute(...).view(N, C*k*k, H/k, W/k)`` (timm's TResNet stem,
any ``reshape`` / ``transpose`` spelling of it, torch.export's ATen form with a ``clone``
between) and ``F.pixel_unshuffle(x, k)`` move each k x k block of pixels into channels: every
output cell reads one block, a window of k pixels at stride k. Decided from the shapes alone:
the 6-D view must split the height into ``(H/k, k)`` and the width into ``(W/k, k)``, and the
permutation must keep the block rows and columns as the last two axes.

Each is replaced by ``conv2d`` with kernel k, stride k and a one-hot weight: output channel
``o`` copies the input value the regrouping puts there (``1 * x`` plus exact zeros, the same
numbers in float32), a layer every part of the conversion (geometry, output stride, export)
already reads. The weight is made by running the same permutation on the block's indices.
Depth-to-space (the inverse, which enlarges the map) is not rewritten.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from .graph import op_name, shape_of
from .head import permutation

__all__ = ["regroup_space_to_depth"]

VIEWS = frozenset({"view", "reshape", "_unsafe_view"})
COPIES = frozenset({"contiguous", "clone"})


def regroup_space_to_depth(gm: fx.GraphModule, modules: dict[str, nn.Module]) -> list[str]:
    """Rewrite every space-to-depth in ``gm`` (shapes propagated) as a convolution; the
    names of the nodes replaced."""
    done = []
    for node in list(gm.graph.nodes):
        found = _pixel_unshuffle(node, modules) or _view_permute_view(node, modules)
        if found is None:
            continue
        source, last, block, order = found
        _replace(gm, source, last, block, order)
        done.append(last.name)
    if done:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return done


def _pixel_unshuffle(node: fx.Node, modules: dict[str, nn.Module]):
    name = op_name(node, modules)
    if name not in ("pixel_unshuffle", "PixelUnshuffle") or not node.args:
        return None
    k = (modules[str(node.target)].downscale_factor if node.op == "call_module"
         else node.args[1] if len(node.args) > 1 else node.kwargs.get("downscale_factor"))
    source = node.args[0]
    if not isinstance(k, int) or not isinstance(source, fx.Node) or shape_of(source) is None:
        return None
    return source, node, k, (1, 3, 5)  # channels ordered (c, row in block, column in block)


def _view_permute_view(node: fx.Node, modules: dict[str, nn.Module]):
    """``node`` as the last view of a space-to-depth chain: (source, node, k, channel order)."""
    out = shape_of(node)
    if op_name(node, modules) not in VIEWS or out is None or len(out) != 4:
        return None
    permuted = node.args[0]
    while isinstance(permuted, fx.Node) and op_name(permuted, modules) in COPIES:
        permuted = permuted.args[0]
    if not isinstance(permuted, fx.Node) or op_name(permuted, modules) != "permute":
        return None
    split = permuted.args[0]
    if not isinstance(split, fx.Node) or op_name(split, modules) not in VIEWS:
        return None
    source = split.args[0]
    six, four = shape_of(split), shape_of(source) if isinstance(source, fx.Node) else None
    if six is None or four is None or len(six) != 6 or len(four) != 4:
        return None
    n, c, h, w = four
    k = six[3]
    perm = permutation(permuted, "permute", 6)
    if (k < 2 or six != (n, c, h // k, k, w // k, k) or h % k or w % k or perm is None
            or perm[0] != 0 or perm[4:] != [2, 4] or sorted(perm[1:4]) != [1, 3, 5]
            or out != (n, c * k * k, h // k, w // k) or any(len(u.users) > 1 for u in (split, permuted))):
        return None
    return source, node, k, tuple(perm[1:4])


def _replace(gm: fx.GraphModule, source: fx.Node, last: fx.Node, k: int, order: tuple[int, ...]) -> None:
    meta = source.meta["tensor_meta"]
    c = shape_of(source)[1]  # type: ignore[index]
    # the block's values numbered in (channel, row, column) order, put where the regrouping puts them
    index = torch.arange(c * k * k).view(1, c, 1, k, 1, k).permute(0, *order, 2, 4).reshape(-1)
    weight = F.one_hot(index, c * k * k).to(meta.dtype).view(c * k * k, c, k, k)
    name = f"{last.name}_space_to_depth"
    device = next(iter(gm.state_dict().values()), weight).device
    gm.register_buffer(name, weight.to(device))
    with gm.graph.inserting_before(last):
        w = gm.graph.get_attr(name)
        conv = gm.graph.call_function(torch.conv2d, (source, w, None, k))
    last.replace_all_uses_with(conv)
    conv.meta = dict(last.meta)
