"""The llamacpp engine's bookkeeping of llama.cpp sequence ids and kept sequences, and what it reads (no llama.cpp
needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tokenwire.engine.llamacpp.kept import Kept, KeptSequences, SequenceIds, common_prefix


def test_common_prefix_counts_the_leading_tokens_two_lists_share() -> None:
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([], [1]) == 0
    assert common_prefix([9], [1]) == 0


def test_sequence_ids_are_handed_out_once_until_given_back() -> None:
    ids = SequenceIds(3)
    taken = [ids.take(), ids.take(), ids.take()]
    assert sorted(taken) == [0, 1, 2] and ids.available == 0
    with pytest.raises(RuntimeError, match=r"no llama\.cpp sequence id"):
        ids.take()
    ids.give_back(taken[1])
    assert ids.take() == taken[1]


def test_the_donor_is_the_sequence_with_the_longest_shared_prefix_kept_or_running() -> None:
    kept = KeptSequences()
    kept.put("a", Kept(seq=4, tokens=[1, 2, 3], paused=False))
    kept.put("b", Kept(seq=5, tokens=[1, 2, 3, 4, 5], paused=True))
    assert kept.best_donor([1, 2, 3, 4, 9]) == (5, 4)
    assert kept.best_donor([1, 2, 3, 4, 9], running=[(7, [1, 2, 3, 4, 9, 9])]) == (7, 5)  # a running one wins
    assert kept.best_donor([8, 8]) == (-1, 0)
    assert kept.tokens == 8 and kept.paused_tokens == 5 and len(kept) == 2


def test_the_oldest_kept_sequence_gives_way_first_and_a_used_donor_becomes_the_newest() -> None:
    kept = KeptSequences()
    kept.put("a", Kept(seq=1, tokens=[1, 2], paused=False))
    kept.put("b", Kept(seq=2, tokens=[3, 4], paused=False))
    assert kept.oldest() == "a"
    kept.best_donor([1, 2, 5])  # "a" served a prompt: kept longer
    assert kept.oldest() == "b"
    taken = kept.take("b")
    assert taken is not None and taken.seq == 2 and "b" not in kept
    assert kept.take("b") is None


def test_the_llamacpp_engine_reads_gguf_files_and_folders_of_the_families_tokenwire_writes_as_one(
    tiny_model_dir: Path, tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A GGUF file is read as it is; a Hugging Face folder of a family tokenwire converts is written as a float16
    GGUF file once; any other folder is refused with the reason, naming it."""
    import json

    from tokenwire.engine import models
    from tokenwire.engine.llamacpp.engine import gguf_of

    cache = tmp_path / "cache"
    monkeypatch.setenv("TOKENWIRE_CACHE_DIR", str(cache))
    assert gguf_of(models.resolve(str(tiny_gguf))) == tiny_gguf
    written = gguf_of(models.resolve(str(tiny_model_dir)))
    assert written.suffix == ".gguf" and written.is_file() and written.parent == cache
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"architectures": ["MambaForCausalLM"]}))
    with pytest.raises(ValueError, match="MambaForCausalLM") as refused:
        gguf_of(models.resolve(str(other)))
    assert "other" in str(refused.value)
