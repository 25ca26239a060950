"""A swap connector for tests: after each swap-out it overwrites the victim's device blocks with
noise, so a resumed victim's output is right only if its KV came back from the host copy;
`POISONED_SWAP_SKIP_LOAD=1` also skips the loads (the noise then shows in the output)."""

from __future__ import annotations

import os

import torch

from kvbench.vllm.swap_connector import KvbenchSwapConnector


class PoisonedSwapConnector(KvbenchSwapConnector):
    def handle_preemptions(self, kv_connector_metadata) -> None:
        super().handle_preemptions(kv_connector_metadata)
        generator = torch.Generator().manual_seed(0)
        for job in kv_connector_metadata.swap_out:
            for layer in self.worker.layers:
                blocks = layer[:, :, list(job.block_ids)]
                layer[:, :, list(job.block_ids)] = 10 * torch.randn(
                    blocks.shape, generator=generator, dtype=blocks.dtype)

    def start_load_kv(self, forward_context, **kwargs) -> None:
        if os.environ.get("POISONED_SWAP_SKIP_LOAD") != "1":
            super().start_load_kv(forward_context, **kwargs)
