"""vLLM's entry point for kvbench (`vllm.general_plugins`, pyproject.toml): with kvbench
installed beside vLLM, every vLLM process knows kvbench's connectors and offloading spec by name,
so a server needs no module paths:

    vllm serve MODEL --scheduler-cls kvbench.vllm.scheduler.KvbenchScheduler \\
        --kv-transfer-config '{"kv_connector": "KvbenchSwapConnector", "kv_role": "kv_both"}'

Registration is lazy (vLLM imports a module only when its name is used) and safe to repeat.
"""

from __future__ import annotations

CONNECTORS = {
    "KvbenchSwapConnector": "kvbench.vllm.swap_connector",
    "KvbenchWriteThroughConnector": "kvbench.vllm.write_through",
}
SPECS = {"TorchCopyOffloadingSpec": "kvbench.vllm.offload_spec"}


def register() -> None:
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    from vllm.v1.kv_offload.factory import OffloadingSpecFactory

    for factory, names in ((KVConnectorFactory, CONNECTORS), (OffloadingSpecFactory, SPECS)):
        for name, module in names.items():
            if name not in factory._registry:  # vLLM loads plugins once per process and role
                factory.register_connector(name, module, name) if factory is \
                    KVConnectorFactory else factory.register_spec(name, module, name)
