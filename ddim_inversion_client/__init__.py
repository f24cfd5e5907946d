"""Python client of the DDIM inversion service (sync and asyncio, on httpx).

    from ddim_inversion_client import InversionClient

    with InversionClient("http://127.0.0.1:8000", api_key="...") as client:
        job = client.submit("samples/chelsea.png", "a photo of a cat", num_inference_steps=50)
        latents = job.wait(timeout=600).latents()        # torch.Tensor (1, 4, H/8, W/8)

Importing the client never imports torch: only `latents()` / `tensors()` / `result()` with
format="torch" (the default) do; format="numpy" needs numpy alone.
"""

from __future__ import annotations

from ddim_inversion_client.aio import AsyncInversionClient, AsyncJob
from ddim_inversion_client.errors import InversionError, JobFailed
from ddim_inversion_client.settings import ClientSettings
from ddim_inversion_client.sync import InversionClient, Job

__all__ = [
    "AsyncInversionClient",
    "AsyncJob",
    "ClientSettings",
    "InversionClient",
    "InversionError",
    "Job",
    "JobFailed",
]
