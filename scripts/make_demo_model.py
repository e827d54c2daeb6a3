"""Write a tiny random-weight MoE checkpoint (native longmoe format) with a BPE tokenizer trained on the English
documentation that ships with Python (pydoc_data), so `run.sh` works on a fresh machine with no downloads.
The weights are random: the text it generates is noise. Point run.sh at a real checkpoint for real text."""

import pydoc_data.topics
import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from longmoe.checkpoint import native, save
from longmoe.model import ModelConfig, Transformer

out = Path(sys.argv[1] if len(sys.argv) > 1 else "demo-model")
out.mkdir(parents=True, exist_ok=True)

tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
trainer = trainers.BpeTrainer(
    vocab_size=4096, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
)
tok.train_from_iterator(pydoc_data.topics.topics.values(), trainer)
tok.save(str(out / "tokenizer.json"))

config = ModelConfig(
    vocab_size=4096, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=2, intermediate_size=512,
    num_experts=8, num_experts_per_tok=2, moe_intermediate_size=256, max_position_embeddings=1 << 20,
    rope_theta=1e6,
)  # fmt: skip
model = Transformer(config)
model.init_weights(seed=0)
save(native(model), out)
print(f"wrote {out}/ (random weights)", file=sys.stderr)
