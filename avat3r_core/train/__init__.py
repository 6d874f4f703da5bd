"""Training without Ray: the recipe (:mod:`.config`), the step and loop (:mod:`.loop`), checkpoints and
RNG (:mod:`.state`), the logs (:mod:`.logger`), synthetic data (:mod:`.synthetic`) and the collective
decisions across ranks (:mod:`.collectives`). ``stages.train`` runs the loop under Ray Train.
"""
