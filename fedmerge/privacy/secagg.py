"""``secagg``: secure aggregation of the parties of one domain (Flower's SecAgg+).

The server receives only each domain's sum of its parties' updates (weighted by their users,
whose counts are summed securely too), never one party's update. It hides parties within a
domain from the server, never domains from one another: the merge across domains proceeds on
the domains' aggregates as usual. Nothing is noised and nothing is spent. The masking is
Flower's SecAgg+ (``server/secagg.py``); in one process the parties' sum is taken directly.
"""

from __future__ import annotations

from fedmerge.errors import FedmergeError
from fedmerge.privacy.base import Mechanism, register


@register
class SecAgg(Mechanism):
    """Each domain's parties are summed securely (see the module docstring)."""

    name = "secagg"
    hides_parties = True

    def check(self, method: str, learn: str, rows: str, parties_per_domain: int) -> None:
        """Refuse a domain of one party: there is nothing to hide it among."""
        if parties_per_domain < 2:
            raise FedmergeError(
                "privacy.mechanism = secagg hides each party among the other parties of its "
                f"domain, but parties_per_domain = {parties_per_domain}; set parties_per_domain "
                "to 2 or more"
            )
