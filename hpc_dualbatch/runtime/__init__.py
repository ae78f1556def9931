"""What a run stands on: MPI topology and how every rank ends, the trainer, model and
step, flat buffers, the synchronous baseline, checkpoints, the run folder and metrics; and
the step time measured for `hpc-dualbatch profile`.
"""
