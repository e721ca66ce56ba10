"""Sparse mixture-of-experts: the MoE layer, upcycling a dense LM, routing context and records."""

from stgc.moe.layer import RoutingRecord, SparseMoE, routing_stats
from stgc.moe.upcycle import moe_layers, moe_losses, routing_context, short_layer_name, upcycle

__all__ = [
    "RoutingRecord",
    "SparseMoE",
    "moe_layers",
    "moe_losses",
    "routing_context",
    "routing_stats",
    "short_layer_name",
    "upcycle",
]
