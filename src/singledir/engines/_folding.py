"""Clamping folded into the next layer's weights.

When an ablated layer feeds only a Linear layer, clamping its units and then
applying that layer equals applying it with the clamped input columns zeroed and their
value moved into the bias: ``W (m * a + (1 - m) * v) + b = (W m) a + (W (1 - m) v + b)``.
With one mask per replica of the batch, this is one batched matrix product instead of a
masking pass over the whole activation, which is where cached curves spend their time.
"""

from __future__ import annotations

import torch
from torch import Tensor, fx, nn
from torch.nn import functional as F

from singledir.ablation import UnitClamp

_CONVOLVE = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def foldable_consumer(
    graph_module: fx.GraphModule, node: fx.Node, unit_dim: int, ndim: int
) -> fx.Node | None:
    """Return the Linear or Conv node that is the only user of ``node``, if it can fold."""
    users = list(node.users)
    if len(users) != 1 or users[0].op != "call_module":
        return None
    consumer_node = users[0]
    if consumer_node.args != (node,) or consumer_node.kwargs:
        return None
    consumer = graph_module.get_submodule(str(consumer_node.target))
    dim = unit_dim % ndim
    if type(consumer) is nn.Linear and dim == ndim - 1:
        return consumer_node
    # Conv consumers are not folded: their weights are large and late feature maps are
    # small, so masking the input is cheaper than masking the weights per group.
    return None


class MaskedConsumer(nn.Module):
    """A Linear or Conv layer that applies each replica's clamp of its input layer."""

    def __init__(self, consumer: nn.Module, clamp: UnitClamp, layer: str) -> None:
        super().__init__()
        self.consumer = consumer
        self.clamp = clamp
        self.layer = layer
        # Set by an engine: replica of the input that each group reads. Several groups
        # may share one input replica, and the output has one replica per group.
        self.sources: list[int] | None = None

    def forward(self, inputs: Tensor) -> Tensor:
        groups = self.clamp.num_groups
        linear = isinstance(self.consumer, nn.Linear)
        in_features = inputs.shape[-1] if linear else inputs.shape[1]
        mask = self.clamp.group_mask(self.layer, in_features, inputs.device)
        keep = (~mask).to(inputs.dtype)
        fill = self.clamp.fill_values(self.layer, in_features, inputs)
        if self.sources is not None and len(set(self.sources)) < len(self.sources):
            return self._expand(inputs, keep, fill)
        if linear:
            return self._linear(inputs, keep, fill, groups)
        return self._conv(inputs, keep, fill, groups)

    def _expand(self, inputs: Tensor, keep: Tensor, fill: Tensor) -> Tensor:
        """Apply group g's clamp to input replica ``sources[g]``, for every group."""
        sources = self.sources
        replicas = max(sources) + 1
        batch = inputs.shape[0] // replicas
        if not isinstance(self.consumer, nn.Linear):
            outputs = []
            for group, source in enumerate(sources):
                rows = inputs[source * batch : (source + 1) * batch]
                outputs.append(self._conv(rows, keep[group : group + 1], fill, 1))
            return torch.cat(outputs, dim=0)
        weight = self.consumer.weight
        out_features = weight.shape[0]
        bias = (1 - keep) * fill @ weight.T
        if self.consumer.bias is not None:
            bias = bias + self.consumer.bias
        inner = inputs.shape[1:-1]
        flat = inputs.reshape(replicas, -1, weight.shape[1])
        result = inputs.new_empty((len(sources), flat.shape[1], out_features))
        for source in range(replicas):
            members = [
                group for group, origin in enumerate(sources) if origin == source
            ]
            rows = flat[source]

            # The first group that reads this replica gets the full product.
            lead = members[0]
            lead_output = (weight * keep[lead]) @ rows.T
            lead_output = (lead_output + bias[lead].unsqueeze(1)).T
            result[lead] = lead_output
            if len(members) == 1:
                continue

            # The others differ from it only in the units whose keep flag differs:
            # output_g - output_lead = sum over u of
            # (keep_g[u] - keep_lead[u]) * (input[u] - fill[u]) * weight[:, u].
            others = torch.as_tensor(members[1:], device=inputs.device)
            change = keep[others] - keep[lead]
            units = (change != 0).any(dim=0).nonzero().squeeze(1)
            if units.numel() == 0:
                result[others] = lead_output
                continue
            centred = rows.index_select(1, units) - fill[units]
            scaled = change[:, units].T.unsqueeze(2) * weight.T[units].unsqueeze(1)
            correction = centred @ scaled.reshape(units.numel(), -1)
            correction = correction.view(-1, len(others), out_features).transpose(0, 1)
            result[others] = lead_output + correction
        return result.reshape(len(sources) * batch, *inner, out_features)

    def _linear(
        self, inputs: Tensor, keep: Tensor, fill: Tensor, groups: int
    ) -> Tensor:
        weight = self.consumer.weight
        bias = (1 - keep) * fill @ weight.T
        if self.consumer.bias is not None:
            bias = bias + self.consumer.bias
        grouped = inputs.reshape(groups, -1, inputs.shape[-1])
        masked = weight.unsqueeze(0) * keep.unsqueeze(1)
        # With 10 outputs, (groups, out, in) @ (groups, in, rows) measured 1.8 times
        # faster than (rows, in) @ (in, out) on a 2-core CPU, for 8 groups of 1,024 rows.
        product = torch.bmm(masked, grouped.transpose(1, 2))
        result = (product + bias.unsqueeze(2)).transpose(1, 2)
        return result.reshape(*inputs.shape[:-1], weight.shape[0])

    def _conv(self, inputs: Tensor, keep: Tensor, fill: Tensor, groups: int) -> Tensor:
        conv = self.consumer
        convolve = _CONVOLVE[inputs.dim() - 2]
        spatial = [1] * (inputs.dim() - 2)
        outputs = []
        batch = inputs.shape[0] // groups
        for group in range(groups):
            weight = conv.weight * keep[group].view(1, -1, *spatial)
            rows = inputs[group * batch : (group + 1) * batch]
            result = convolve(
                rows, weight, conv.bias, conv.stride, conv.padding, conv.dilation
            )
            moved = (1 - keep[group]) * fill
            if bool(moved.any()):
                # The clamped value is a constant map, padded with zeros like the input.
                constant = moved.view(1, -1, *spatial).expand(1, -1, *rows.shape[2:])
                result = result + convolve(
                    constant,
                    conv.weight,
                    None,
                    conv.stride,
                    conv.padding,
                    conv.dilation,
                )
            outputs.append(result)
        return torch.cat(outputs, dim=0)


def fold_consumers(
    suffix: fx.GraphModule,
    layer_nodes: dict[str, fx.Node],
    clamp: UnitClamp,
    unit_dim: int,
    shapes: dict[str, tuple[int, ...]],
) -> set[str]:
    """Swap each foldable consumer in ``suffix`` for a MaskedConsumer.

    ``layer_nodes`` maps ablated layer names to their nodes in ``suffix``. Returns the
    names of the layers whose clamp now happens in their consumer.
    """
    folded = set()
    for name, node in layer_nodes.items():
        if clamp.output_keys.get(name) is not None:
            continue
        consumer_node = foldable_consumer(suffix, node, unit_dim, len(shapes[name]))
        if consumer_node is None or str(consumer_node.target) in layer_nodes:
            continue
        consumer = suffix.get_submodule(str(consumer_node.target))
        replacement = f"singledir_masked_{name.replace('.', '_')}"
        suffix.add_submodule(replacement, MaskedConsumer(consumer, clamp, name))
        consumer_node.target = replacement
        folded.add(name)
    suffix.recompile()
    return folded
