"""Adding special tokens to a model and its tokenizer: shared by the methods that train new
token rows (aLoRA, SpaRTA)."""

from __future__ import annotations


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
