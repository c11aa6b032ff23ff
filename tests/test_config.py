"""`trl sft` names in SFTMixConfig, and dataset mixtures / configurations resolved offline from local files."""

import json

import pytest
from conftest import make_conversations, write_jsonl

from sftmix.cli import _parse
from sftmix.config import SFTMixConfig
from sftmix.errors import InputError
from sftmix.keys import result_settings
from sftmix.recipes.common import resolve_datasets


def parse_yaml(tmp_path, text: str) -> SFTMixConfig:
    (tmp_path / "c.yaml").write_text(f"output_dir: {tmp_path / 'out'}\nuse_cpu: true\n" + text)
    return _parse(SFTMixConfig, "sftmix train", ["--config", str(tmp_path / "c.yaml")])


def ids_of(path) -> list[str]:
    return [json.loads(line)["id"] for line in open(path)]


def test_mixture_with_fractions_as_trl_mixes_them(tmp_path):
    """TRL's DatasetMixtureConfig: shares normalised to one; the largest mixture that oversamples no dataset."""
    write_jsonl(tmp_path / "a.jsonl", make_conversations(16))
    write_jsonl(tmp_path / "b.jsonl", [{**row, "id": f"b{i}"} for i, row in enumerate(make_conversations(8))])
    config = parse_yaml(tmp_path, (
        "datasets:\n"
        f"  - path: json\n    data_files: {tmp_path / 'a.jsonl'}\n    fraction: 3\n"
        f"  - path: {tmp_path / 'b.jsonl'}\n    fraction: 1\n    columns: [id, instruction, output]\n"
        "test_split_size: 0.25\neval_strategy: steps\neval_steps: 1\n"))
    resolve_datasets(config)
    # shares 0.75 / 0.25; N = min(16 / 0.75, 8 / 0.25) = 21.33: the first 16 of a, the first 5 of b
    train_ids, test_ids = ids_of(config.dataset_path), ids_of(config.eval_dataset_path)
    assert sorted(train_ids + test_ids) == sorted([f"e{i}" for i in range(16)] + [f"b{i}" for i in range(5)])
    assert len(test_ids) == 5  # round(0.25 * 21)


def test_dataset_config_of_a_local_dataset_repository(tmp_path):
    """dataset_name + dataset_config: a directory laid out as a hub dataset with named configurations."""
    repo = tmp_path / "repo"
    for config_name, count in (("small", 3), ("big", 6)):
        (repo / config_name).mkdir(parents=True)
        rows = [{**row, "id": f"{config_name}{i}"} for i, row in enumerate(make_conversations(count))]
        write_jsonl(repo / config_name / "train.jsonl", rows)
    (repo / "README.md").write_text(
        "---\nconfigs:\n" + "".join(
            f"- config_name: {name}\n  data_files:\n  - split: train\n    path: {name}/train.jsonl\n"
            for name in ("small", "big")) + "---\n")
    config = parse_yaml(tmp_path, f"dataset_name: {repo}\ndataset_config: big\ndataset_train_split: train\n")
    resolve_datasets(config)
    assert ids_of(config.dataset_path) == [f"big{i}" for i in range(6)]


def test_trl_names_map_onto_sftmix_fields(tmp_path):
    config = parse_yaml(tmp_path, "dataset_name: data.jsonl\ndataset_train_split: first\nloss_type: nll\n"
                                  "lora_target_modules: [q_proj]\n")
    assert (config.dataset_path, config.dataset_split, config.loss_type) == ("data.jsonl", "first", "ntp")
    assert config.lora_target_modules == ["q_proj"]
    with pytest.raises(InputError, match="streaming"):
        parse_yaml(tmp_path, "dataset_name: data.jsonl\ndataset_streaming: true\n")
    with pytest.raises(InputError, match="disagree"):
        parse_yaml(tmp_path, "dataset_name: a.jsonl\ndataset_path: b.jsonl\n")


def test_result_settings_leave_out_bookkeeping_inputs_and_secrets():
    def settings(**fields):
        return result_settings(SFTMixConfig(**{"output_dir": "a", "loss_type": "ntp", "eos_token": "<|im_end|>",
                                               **fields}))

    base = settings()
    assert base["eos_token"] == "<|im_end|>" and base["processes"] == 1  # to_dict() masks every *_token field
    bookkeeping = settings(output_dir="b", logging_steps=7, save_steps=3, save_total_limit=1, eval_steps=4,
                           report_to=[], run_name="x", disable_tqdm=True, hub_token="secret-value",
                           dataloader_num_workers=2)
    inputs = settings(dataset_path="other.jsonl", model_name_or_path="other-model", max_examples=5)
    no_mixup_read = settings(mixup_weight=0.9, mixup_alpha=0.1)  # NTP reads no Mixup setting
    assert bookkeeping == inputs == no_mixup_read == base
    assert "secret-value" not in json.dumps(result_settings(SFTMixConfig(output_dir="a", hub_token="secret-value")))
    for change in ({"learning_rate": 1e-4}, {"truncation": "right"}, {"dtype": "bfloat16"}, {"lora_dropout": 0.0},
                   {"save_dtype": "bfloat16"}, {"dataloader_drop_last": True}, {"eos_token": "</s>"}):
        assert settings(**change) != base, change
    mixing = result_settings(SFTMixConfig(output_dir="a", mixup_weight=0.2))
    assert result_settings(SFTMixConfig(output_dir="a", mixup_weight=0.5)) != mixing


def test_mixture_test_splits_of_other_seeds_never_overwrite_each_other(tmp_path):
    """The test split is drawn with the seed: jobs with other seeds sharing $SFTMIX_CACHE keep their own files."""
    write_jsonl(tmp_path / "a.jsonl", make_conversations(20))
    mixture = (f"datasets:\n  - path: {tmp_path / 'a.jsonl'}\ntest_split_size: 0.25\neval_strategy: steps\n"
               "eval_steps: 1\n")
    first = parse_yaml(tmp_path, mixture + "seed: 1\n")
    resolve_datasets(first)
    first_train, first_test = ids_of(first.dataset_path), ids_of(first.eval_dataset_path)
    second = parse_yaml(tmp_path, mixture + "seed: 2\n")
    resolve_datasets(second)
    assert ids_of(second.eval_dataset_path) != first_test and len(first_test) == 5  # each seed draws its own split
    assert (ids_of(first.dataset_path), ids_of(first.eval_dataset_path)) == (first_train, first_test)  # intact
    assert sorted(first_train + first_test) == sorted(f"e{i}" for i in range(20))


@pytest.mark.parametrize("size", [20, 30])
def test_test_split_that_leaves_nothing_to_train_is_refused(tmp_path, size):
    write_jsonl(tmp_path / "a.jsonl", make_conversations(20))
    config = parse_yaml(tmp_path, f"datasets:\n  - path: {tmp_path / 'a.jsonl'}\ntest_split_size: {size}\n")
    with pytest.raises(InputError, match=rf"test_split_size {size} takes {size} of the mixture's 20 records"):
        resolve_datasets(config)
