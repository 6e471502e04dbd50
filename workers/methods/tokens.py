"""Adding special tokens to a model and its tokenizer: shared by the methods that train new
token rows (aLoRA, SpaRTA), and growing a base for an adapter saved with added tokens."""

from __future__ import annotations

from pathlib import Path


def grow_base(base, folder: Path) -> None:
    """An adapter that added tokens saved its tokenizer beside it: grow the base's embeddings to fit
    (the adapter's saved embedding rows fill the new ones)."""
    if not (Path(folder) / "tokenizer_config.json").is_file():
        return
    from transformers import AutoTokenizer

    n = len(AutoTokenizer.from_pretrained(str(folder)))
    if base.get_input_embeddings().weight.shape[0] < n:
        base.resize_token_embeddings(n, mean_resizing=False)


def add_new_tokens(model, tokenizer, tokens: list[str]) -> list[int]:
    """Add `tokens` as special tokens and grow the embeddings (new rows start at the mean of the
    old ones); returns their ids."""
    from workers.errors import SpecError

    existing = [t for t in tokens if t in tokenizer.get_vocab()]
    if existing:
        raise SpecError(f"adapter.new_tokens {existing} are already in the vocabulary; list only new ones")
    tokenizer.add_tokens(list(tokens), special_tokens=True)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    return tokenizer.convert_tokens_to_ids(list(tokens))
