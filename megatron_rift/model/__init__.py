from megatron_rift.model.builder import build_gpt_model
from megatron_rift.model.config import GPTArchitecture, to_transformer_config
from megatron_rift.model.device_settings import FusedKernels, default_device, device_settings
from megatron_rift.model.spec import get_layer_spec, transformer_engine_available

__all__ = [
    "FusedKernels",
    "GPTArchitecture",
    "build_gpt_model",
    "default_device",
    "device_settings",
    "get_layer_spec",
    "to_transformer_config",
    "transformer_engine_available",
]
