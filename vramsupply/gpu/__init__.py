"""GPU owners' concerns: which devices there are, the memory plan, where the model runs, and doctor.

- `devices`: the devices ggml registered (with free/total memory) and the GPUs the vendor tools list;
- `gguf_header`, `estimate`, `source`, `plan`, `planning`: the memory plan before download and load;
- `accounting`: llama.cpp's own `no_alloc` accounting, to check the plan against;
- `options`: split mode, tensor split, devices and KV cache types into llama.cpp's parameters;
- `report`: where the loaded model runs, and every reason the GPU is not (fully) used;
- `doctor`: `vramsupply doctor`'s checks.
"""
