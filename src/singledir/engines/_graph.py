"""Splitting a traced model at its first ablated layer.

``torch.fx`` traces the model into a graph with the ablated layers kept as single
nodes. The graph is cut into a *prefix*, which runs once per chunk of examples, and a
*suffix*, which runs once per group of ablation masks on the prefix's outputs. Models
that ``torch.fx`` cannot trace (data-dependent control flow, for example) raise
``SplitError`` and are measured with the naive engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import fx, nn


class SplitError(Exception):
    """The model cannot be split for the cached engines; the message says why."""


class _LeafTracer(fx.Tracer):
    def __init__(self, leaves: Sequence[str]) -> None:
        super().__init__()
        self.leaves = set(leaves)

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return qualified_name in self.leaves or super().is_leaf_module(
            module, qualified_name
        )


@dataclass
class SplitModel:
    """A model cut in two at ``cut``, the node after which the suffix starts.

    Attributes:
        prefix: Takes the model's inputs and returns the tuple of ``carried`` values.
        suffix: Takes the ``carried`` values, in order, and returns the model's output.
        carried: Names of the values that cross the cut; the last is the cut node's.
        cut_target: Module name of the cut node.
        batched: For each carried value, whether it depends on the model's inputs.
            Values that do not, such as a parameter transformed in ``forward``, must
            not be repeated per unit set even when their first dimension happens to
            equal the batch size.
    """

    prefix: fx.GraphModule
    suffix: fx.GraphModule
    carried: list[str]
    cut_target: str
    batched: list[bool]


def trace(model: nn.Module, leaves: Sequence[str]) -> fx.GraphModule:
    """Trace ``model`` keeping ``leaves`` as single nodes, or raise SplitError."""
    try:
        graph = _LeafTracer(leaves).trace(model)
    # Any tracing failure means the model cannot be split.
    except Exception as error:
        raise SplitError(f"torch.fx cannot trace the model: {error}") from error
    return fx.GraphModule(model, graph)


def module_nodes(traced: fx.GraphModule, target: str) -> list[fx.Node]:
    return [
        n for n in traced.graph.nodes if n.op == "call_module" and n.target == target
    ]


def _input_dependent(nodes: Sequence[fx.Node]) -> set[fx.Node]:
    """Return the nodes among ``nodes``, in graph order, computed from a placeholder."""
    dependent: set[fx.Node] = set()
    for node in nodes:
        if node.op == "placeholder" or any(
            source in dependent for source in node.all_input_nodes
        ):
            dependent.add(node)
    return dependent


def split_after(
    traced: fx.GraphModule, cut: fx.Node, extra: Sequence[fx.Node] = ()
) -> SplitModel:
    """Cut ``traced`` after node ``cut``: everything up to it is the prefix.

    The prefix returns the carried values, then the values of the ``extra`` nodes, which
    must lie in the prefix.
    """
    nodes = list(traced.graph.nodes)
    position = nodes.index(cut)
    before, after = nodes[: position + 1], nodes[position + 1 :]
    after_set = set(after)
    carried = [
        n for n in before if n is not cut and any(u in after_set for u in n.users)
    ]
    if any(n.op == "output" for n in before):
        raise SplitError("The cut node comes after the model's output.")
    carried.append(cut)

    prefix_graph = fx.Graph()
    prefix_env: dict[fx.Node, fx.Node] = {}
    for node in before:
        prefix_env[node] = prefix_graph.node_copy(node, lambda n: prefix_env[n])
    missing = [n.name for n in extra if n not in prefix_env]
    if missing:
        raise SplitError(f"Nodes {missing} are not before the cut.")
    prefix_graph.output(tuple(prefix_env[n] for n in [*carried, *extra]))

    suffix_graph = fx.Graph()
    suffix_env: dict[fx.Node, fx.Node] = {}
    for node in carried:
        suffix_env[node] = suffix_graph.placeholder(f"carried_{node.name}")
    for node in after:
        suffix_env[node] = suffix_graph.node_copy(node, lambda n: suffix_env[n])

    prefix = fx.GraphModule(traced, prefix_graph)
    prefix.graph.eliminate_dead_code()
    prefix.recompile()
    dependent = _input_dependent(before)
    return SplitModel(
        prefix=prefix,
        suffix=fx.GraphModule(traced, suffix_graph),
        carried=[n.name for n in carried],
        cut_target=str(cut.target),
        batched=[n in dependent for n in carried],
    )


def first_ablated_node(traced: fx.GraphModule, layers: Sequence[str]) -> fx.Node:
    """Return the earliest graph node among the ablated layers, or raise SplitError."""
    nodes = list(traced.graph.nodes)
    found = []
    for name in layers:
        calls = module_nodes(traced, name)
        if len(calls) != 1:
            raise SplitError(
                f"Layer '{name}' appears {len(calls)} times in the traced graph, not once."
            )
        found.append(calls[0])
    return min(found, key=nodes.index)
