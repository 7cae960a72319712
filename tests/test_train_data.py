"""Training data for `lowrank finetune`: each record form, loss masks, cutting, packing, splits, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from lowrank_cli.errors import UsageError
from lowrank_cli.train.data import IGNORE, build_datasets, collate_fn, load_records, pack, tokenize_records

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
# renders a conversation differently once it grows (a system line only for the last turn): not prefix-stable
UNSTABLE_TEMPLATE = ("{% for m in messages %}{% if loop.last %}[final]{% endif %}<|{{ m['role'] }}|>"
                     "{{ m['content'] }}<|end|>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def usage_error(excinfo, *needles: str) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and excinfo.value.exit_code == 2
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    return message


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture()
def chat_tok(tokenizer_dir):
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(tokenizer_dir)
    t.chat_template = CHAT_TEMPLATE
    return t


def learned_text(tok, example) -> str:
    return tok.decode([t for t, lab in zip(example["input_ids"], example["labels"], strict=True) if lab != IGNORE])


# ------------------------------------------------------------------------------------------------- forms


def test_text_records_learn_every_token(tmp_path, tok):
    spec = write_jsonl(tmp_path / "d.jsonl", [{"text": "def f(x):\n    return x"}, {"text": "import os"}])
    examples, info = tokenize_records(tok, load_records(spec), max_seq_len=64)
    assert info["records"] == {"text": 2}
    first = examples[0]
    assert first["labels"] == first["input_ids"]
    assert first["input_ids"][-1] == tok.eos_token_id
    assert tok.decode(first["input_ids"][:-1]) == "def f(x):\n    return x"


def test_text_field_option(tmp_path, tok):
    spec = write_jsonl(tmp_path / "d.jsonl", [{"body": "print(1)", "text": 5}])
    records = load_records(spec, text_field="body")
    assert records == [{"kind": "text", "text": "print(1)"}]


def test_prompt_completion_masks_the_prompt(tmp_path, tok):
    spec = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Q: two plus two?\nA:", "completion": " four"}])
    (example,), info = tokenize_records(tok, load_records(spec), max_seq_len=64)
    n_prompt = len(tok("Q: two plus two?\nA:")["input_ids"])
    assert example["labels"][:n_prompt] == [IGNORE] * n_prompt
    assert example["labels"][n_prompt:] == example["input_ids"][n_prompt:]
    assert learned_text(tok, example) == " four<|endoftext|>"
    assert info["records"] == {"prompt_completion": 1}


def test_chat_learns_the_assistant_turns_only(tmp_path, chat_tok):
    convo = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
             {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"},
             {"role": "assistant", "content": "ciao"}]
    spec = write_jsonl(tmp_path / "d.jsonl", [{"messages": convo}])
    (example,), info = tokenize_records(chat_tok, load_records(spec), max_seq_len=256)
    assert info["chat_loss"] == "assistant turns"
    learned = learned_text(chat_tok, example)
    assert "hello" in learned and "ciao" in learned
    assert "hi" not in learned.replace("ciao", "") and "bye" not in learned and "be brief" not in learned
    # the full text is the template's rendering
    assert chat_tok.decode(example["input_ids"]) == chat_tok.apply_chat_template(convo, tokenize=False)


def test_chat_with_an_unstable_template_learns_after_the_last_user_turn(tmp_path, chat_tok):
    chat_tok.chat_template = UNSTABLE_TEMPLATE
    convo = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
             {"role": "user", "content": "bye"}, {"role": "assistant", "content": "ciao"}]
    spec = write_jsonl(tmp_path / "d.jsonl", [{"messages": convo}])
    (example,), info = tokenize_records(chat_tok, load_records(spec), max_seq_len=256)
    assert info["chat_loss"] == "everything after the last user turn"
    learned = learned_text(chat_tok, example)
    assert "ciao" in learned and "hello" not in learned and "bye" not in learned


def test_chat_without_template_is_a_usage_error(tmp_path, tok):
    spec = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "a"},
                                                            {"role": "assistant", "content": "b"}]}])
    with pytest.raises(UsageError) as excinfo:
        tokenize_records(tok, load_records(spec), max_seq_len=64)
    usage_error(excinfo, "chat template")


def test_mixed_forms_in_one_file(tmp_path, chat_tok):
    spec = write_jsonl(tmp_path / "d.jsonl", [
        {"text": "x = 1"}, {"prompt": "p", "completion": "c"},
        {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}])
    _, info = tokenize_records(chat_tok, load_records(spec), max_seq_len=64)
    assert info["records"] == {"text": 1, "prompt_completion": 1, "chat": 1}


def test_plain_text_files_folder_and_glob(tmp_path, tok):
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "a.py").write_text("def a():\n    pass\n")
    (folder / "b.txt").write_text("some prose here")
    assert len(load_records(str(folder))) == 2
    assert [r["text"] for r in load_records(str(folder / "*.txt"))] == ["some prose here"]
    assert load_records(str(folder / "a.py"))[0]["kind"] == "text"


def test_folder_of_jsonl_records(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "completion": "c"}])
    write_jsonl(tmp_path / "b.jsonl", [{"text": "t"}])
    kinds = sorted(r["kind"] for r in load_records(str(tmp_path)))
    assert kinds == ["prompt_completion", "text"]


# ----------------------------------------------------------------------------------------------- lengths


def test_long_text_is_cut_into_pieces_not_lost(tmp_path, tok):
    text = "def function_number_one(argument):\n    return argument * 2\n" * 20
    spec = write_jsonl(tmp_path / "d.jsonl", [{"text": text}])
    examples, info = tokenize_records(tok, load_records(spec), max_seq_len=16)
    full = tok(text)["input_ids"] + [tok.eos_token_id]
    assert all(len(e["input_ids"]) <= 16 for e in examples)
    joined = [t for e in examples for t in e["input_ids"]]
    assert joined == full[:len(joined)] and len(full) - len(joined) <= 1  # a 1-token tail has nothing to predict
    assert info["cut"] == 1


def test_prompt_examples_are_truncated_and_empty_ones_dropped(tmp_path, tok):
    spec = write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "short", "completion": " answer " * 10},
        {"prompt": "a very long prompt " * 20, "completion": " lost"}])
    examples, info = tokenize_records(tok, load_records(spec), max_seq_len=12)
    assert len(examples) == 1 and len(examples[0]["input_ids"]) == 12
    assert info["truncated"] == 2 and info["dropped"] == 1


def test_packing_keeps_tokens_and_masks(tmp_path, tok):
    spec = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"q{i}", "completion": f" a{i}"} for i in range(20)])
    records = load_records(spec)
    plain, _ = tokenize_records(tok, records, max_seq_len=64)
    packed, info = tokenize_records(tok, records, max_seq_len=16, packing=True)
    stream_ids = [t for e in plain for t in e["input_ids"]]
    stream_labels = [t for e in plain for t in e["labels"]]
    assert [t for e in packed for t in e["input_ids"]] == stream_ids
    assert [t for e in packed for t in e["labels"]] == stream_labels
    assert all(len(e["input_ids"]) == 16 for e in packed[:-1])
    assert info["examples"] == len(packed)


def test_pack_drops_blocks_with_nothing_to_learn():
    examples = [{"input_ids": [1, 2, 3, 4], "labels": [IGNORE] * 4}, {"input_ids": [5, 6], "labels": [5, 6]}]
    blocks = pack(examples, 4)
    assert blocks == [{"input_ids": [5, 6], "labels": [5, 6]}]


def test_collate_pads_right_and_masks_padding():
    batch = collate_fn(pad_id=0)([{"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]},
                                  {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
    assert batch["input_ids"].dtype == torch.long


# ------------------------------------------------------------------------------------------------ splits


def test_held_out_split_is_stable_and_disjoint(tmp_path, tok):
    records = [{"prompt": f"question {i}", "completion": f" answer {i}"} for i in range(60)]
    spec = write_jsonl(tmp_path / "d.jsonl", records)
    a = build_datasets(tok, spec, max_seq_len=32, seed=0)
    b = build_datasets(tok, spec, max_seq_len=32, seed=3)
    assert a.eval and 1 <= len(a.eval) < 20

    def key(e):
        return tuple(e["input_ids"])

    assert {key(e) for e in a.eval} == {key(e) for e in b.eval}  # the split ignores the seed
    assert not {key(e) for e in a.eval} & {key(e) for e in a.train}
    assert len(a.train) + len(a.eval) == 60
    assert "held-out" in a.info["eval_data"]


def test_small_dataset_still_holds_one_out(tmp_path, tok):
    spec = write_jsonl(tmp_path / "d.jsonl", [{"text": "one"}, {"text": "two"}, {"text": "three"}])
    data = build_datasets(tok, spec, max_seq_len=32)
    assert len(data.eval) == 1 and len(data.train) == 2


def test_eval_data_is_used_when_given(tmp_path, tok):
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": f"train {i}"} for i in range(5)])
    held = write_jsonl(tmp_path / "e.jsonl", [{"text": "held out text"}])
    data = build_datasets(tok, train, held, max_seq_len=32)
    assert len(data.train) == 5 and len(data.eval) == 1
    assert tok.decode(data.eval[0]["input_ids"][:-1]) == "held out text"


def test_stdlib_default_uses_its_train_and_eval_parts(tok):
    from lowrank_cli.data.sources import load_documents

    data = build_datasets(tok, None, max_seq_len=64, token_budget=2000, max_eval_examples=8)
    assert data.info["train"]["stopped_at_token_budget"] and len(data.eval) == 8
    eval_docs = load_documents("stdlib", part="eval")
    first = tok.decode(data.eval[0]["input_ids"])
    assert any(first in d for d in eval_docs)


# -------------------------------------------------------------------------------------------- bad input


def test_record_without_fields_names_what_it_found(tmp_path, tok):
    spec = write_jsonl(tmp_path / "d.jsonl", [{"text": "ok"}, {"question": "q", "answer": "a"}])
    with pytest.raises(UsageError) as excinfo:
        load_records(spec)
    usage_error(excinfo, "d.jsonl:2", "'text'", "'prompt' and 'completion'", "'messages'", "answer, question")


def test_non_object_record(tmp_path):
    spec = write_jsonl(tmp_path / "d.jsonl", [[1, 2]])
    with pytest.raises(UsageError) as excinfo:
        load_records(spec)
    usage_error(excinfo, "d.jsonl:1", "list")


def test_empty_dataset(tmp_path, tok):
    (tmp_path / "d.jsonl").write_text("\n\n")
    with pytest.raises(UsageError) as excinfo:
        build_datasets(tok, str(tmp_path / "d.jsonl"), max_seq_len=32)
    usage_error(excinfo, "no examples")


def test_only_untrainable_examples(tmp_path, tok):
    spec = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "long prompt " * 30, "completion": "x"}] * 2 +
                       [{"prompt": "another long prompt " * 30, "completion": "y"}])
    with pytest.raises(UsageError) as excinfo:
        build_datasets(tok, spec, max_seq_len=8)
    usage_error(excinfo, "--max-seq-len 8")


def test_bad_messages(tmp_path):
    no_assistant = write_jsonl(tmp_path / "a.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(UsageError) as excinfo:
        load_records(no_assistant)
    usage_error(excinfo, "no assistant turn")
    malformed = write_jsonl(tmp_path / "b.jsonl", [{"messages": "hello"}])
    with pytest.raises(UsageError) as excinfo:
        load_records(malformed)
    usage_error(excinfo, "b.jsonl:1", "role, content")


def test_invalid_json_line(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(UsageError) as excinfo:
        load_records(str(tmp_path / "d.jsonl"))
    usage_error(excinfo, "d.jsonl:2", "not valid JSON")


def test_missing_path(tmp_path):
    with pytest.raises(UsageError) as excinfo:
        load_records(str(tmp_path / "nope" / "x.jsonl"))
    usage_error(excinfo, "does not exist")
