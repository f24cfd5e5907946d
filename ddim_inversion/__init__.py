"""What the gateway, the worker and the client share: the one definition of each fact.

Light on purpose (pydantic, Pillow and NumPy only): the contract of a job (`contract`),
its parameters (`params`, `scheduler_config`), its error codes (`errors`), every Redis
key (`keys`), what a job stores and costs (`estimates`, `held_bytes`), the job metrics'
encoding (`job_metrics`), the image normaliser (`imaging`) and where a webhook may go
(`webhook_policy`). Nothing here imports torch, diffusers, FastAPI or RQ.
"""
