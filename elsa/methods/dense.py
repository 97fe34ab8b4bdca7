"""The unpruned baseline: leaves the weights alone."""
from elsa.methods.base import PruneContext, Pruner


class Dense(Pruner, name="dense", position=0):
    start_eligible = False   # start=dense is no stage: the method starts from the dense model (conf/start/dense.yaml)

    def validate(self, plan) -> None:
        pass

    def prune(self, ctx: PruneContext) -> dict:
        return {}
