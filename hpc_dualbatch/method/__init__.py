"""The method's pure pieces: schedules, the time model, the dual-batch planner, adaptive
re-planning and the merge rules. No MPI, no files but the timing file.
"""
