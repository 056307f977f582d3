"""`hydra/sweeper=zootrain_optuna`: hydra-optuna-sweeper with its study in a database that
outlives the sweep, continued by the same command (`zootrain.studies`).

Hydra builds sweepers only from the `hydra_plugins` namespace, and imports every module in it
when it starts (`--help` too): this one imports no more than the Optuna plugin's config does.
Hydra runs it without registering it in `sys.modules` first, where dataclasses look up string
annotations: so no `from __future__ import annotations` here.
"""

from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf
from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper


class PersistentOptunaSweeper(OptunaSweeper):
    """The Optuna plugin's sweeper, run by `zootrain.studies.StudySweeper`."""

    def __init__(self, **options: Any) -> None:
        from zootrain.studies import StudySweeper  # Optuna and SQLAlchemy: when a sweep starts

        self.sweeper = StudySweeper(**options)


@dataclass
class PersistentOptunaSweeperConf(OptunaSweeperConf):
    _target_: str = "hydra_plugins.zootrain_optuna.PersistentOptunaSweeper"
    # Seconds between a running trial's heartbeats; a trial without one for twice as long (its
    # sweeper was killed) is failed by the next sweeper of the study that looks.
    heartbeat_interval: int = 60


ConfigStore.instance().store(
    group="hydra/sweeper",
    name="zootrain_optuna",
    node=PersistentOptunaSweeperConf,
    provider="backbone-zoo",
)
