"""Training: the one list of runs, one run from start to finish (record, data, fit, evaluation), the stages that
train runs (cv, fixed, baselines, ablations, distill) and where runs go (--jobs, torchrun)."""
