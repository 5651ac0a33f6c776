"""Placement policies: each picks an instance for a request from a model's pool.

One module per policy behind :class:`corral.scheduling.policies.base.Policy`. The
scheduler passes only candidates that are usable and have a free slot, so a policy
decides preference, never capacity.
"""

from __future__ import annotations

from corral.scheduling.policies.base import Placement, Policy, Served
from corral.scheduling.policies.least_busy import LeastBusy
from corral.scheduling.policies.prefix import PrefixPolicy, PrefixSettings
from corral.scheduling.policies.random import RandomPolicy
from corral.scheduling.policies.round_robin import RoundRobin

POLICIES: dict[str, type[Policy]] = {
    "least_busy": LeastBusy,
    "round_robin": RoundRobin,
    "random": RandomPolicy,
    "prefix": PrefixPolicy,
}


def make_policy(name: str, *, pin_slots: bool = False) -> Policy:
    """The policy called ``name``; ``pin_slots`` applies to ``prefix`` only."""
    if name == "prefix":
        return PrefixPolicy(PrefixSettings(pin_slots=pin_slots))
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose from {sorted(POLICIES)}") from None


__all__ = [
    "POLICIES",
    "LeastBusy",
    "Placement",
    "Policy",
    "PrefixPolicy",
    "RandomPolicy",
    "RoundRobin",
    "Served",
    "make_policy",
]
