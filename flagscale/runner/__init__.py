"""What `flagscale train | infer | serve` share: composed Hydra configs and recorded processes."""
