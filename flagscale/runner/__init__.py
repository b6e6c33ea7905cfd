"""What `flagscale train | infer | serve` share, on the way from a config to running processes.

config (the composed Hydra config, its action and task type) -> task (one Task protocol, one action switch)
-> environment (the job's device and its variables), hostfile and ssh (the nodes and how to reach them)
-> process and supervise (recorded processes, started, stopped and reported) and wait (one polling loop).
"""
