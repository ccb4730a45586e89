"""The ROUTER/ROUTER broker: frontend for clients, backend for worker processes, a worker
registry fed by heartbeats, a routing policy, a priority queue and a journal."""
