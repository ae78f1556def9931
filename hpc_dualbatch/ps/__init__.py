"""The asynchronous parameter server: the protocol and its typed messages, the server's
decisions (no MPI), its driver on rank 0, the stall watch, and a worker group's side.
"""
