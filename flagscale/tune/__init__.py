"""`action=auto_tune`: the training tuner (flagscale.tune.train) and the serving tuner (flagscale.tune.serve).

Both enumerate a search space from `experiment.auto_tuner`, refuse what cannot run before launching anything,
measure each candidate as a real job through the task's own launcher, record every candidate in
`history.json`/`history.csv`, and write the best configuration as a runnable experiment YAML. Nothing heavy is
imported here.
"""
