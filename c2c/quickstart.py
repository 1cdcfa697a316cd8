"""The README's quickstart: C2C generation with the offline tiny pair (random, untrained fuser).

Run: python -m c2c.quickstart
"""

import torch

from c2c.align import layer_map
from c2c.fused import C2CModel, generate_from_prefix
from c2c.fuser import C2CFuser, FuserConfig
from c2c.models import load_model


def main() -> None:
    torch.manual_seed(0)
    receiver, receiver_tok = load_model("tiny-receiver")  # or "Qwen/Qwen3-0.6B", a local folder, a .gguf file
    sharer, sharer_tok = load_model("tiny-sharer")  # a different tokenizer: aligned token by token
    config = FuserConfig.for_models(receiver.config, sharer.config, layer_map(4, 3), hidden_dim=64, intermediate_dim=64)
    fuser = C2CFuser(config).eval()  # or c2c.checkpoint.load_fuser(folder): ours or a published one
    model = C2CModel(receiver, receiver_tok, [sharer], [sharer_tok], [fuser])
    inputs = model.prepare([[{"role": "user", "content": "What is the capital of France?"}]])
    fused = model.generate(inputs, max_new_tokens=16, do_sample=False)
    alone = generate_from_prefix(receiver, inputs.input_ids, inputs.attention_mask, max_new_tokens=16, do_sample=False)
    prompt_length = inputs.input_ids.shape[1]
    print("receiver alone:", repr(receiver_tok.decode(alone[0, prompt_length:])))
    print("C2C:           ", repr(receiver_tok.decode(fused[0, prompt_length:])))
    print("open gates (layer, K/V):", fuser.open_gates().tolist())


if __name__ == "__main__":
    main()
