"""The synthetic prompt generator: deterministic per seed, disjoint across workers, thousands of prompts."""

import pytest

from flow_lune.training.prompts import (
    ATTRIBUTES,
    CONTEXTS,
    SUBJECTS,
    TEMPLATES,
    SyntheticPrompts,
    generate,
    prompts_for_worker,
)


def test_enough_distinct_prompts():
    gen = SyntheticPrompts(0)
    assert min(len(SUBJECTS), len(ATTRIBUTES), len(CONTEXTS)) >= 24
    assert gen.num_combinations == len(TEMPLATES) * len(SUBJECTS) * len(ATTRIBUTES) * len(CONTEXTS) > 10_000
    prompts = gen.generate(5000)
    assert len(set(prompts)) == 5000  # distinct combinations give distinct strings
    # Every list contributes: a prompt contains its subject and context words.
    assert all(any(s in p for s in SUBJECTS) and any(c in p for c in CONTEXTS) for p in prompts[:200])


def test_same_seed_same_prompts_other_seed_other_prompts():
    assert generate(50, seed=3) == generate(50, seed=3) == SyntheticPrompts(3).generate(50)
    assert generate(50, seed=3) != generate(50, seed=4)
    assert generate(7, seed=3, worker_id=1, num_workers=2) == generate(7, seed=3, worker_id=1, num_workers=2)


@pytest.mark.parametrize("num_workers", [2, 4])
def test_workers_do_not_repeat_each_other(num_workers):
    shares = [generate(300, seed=11, worker_id=w, num_workers=num_workers) for w in range(num_workers)]
    assert all(len(share) == 300 for share in shares)
    union = set().union(*map(set, shares))
    assert len(union) == 300 * num_workers  # disjoint, and no repeats within a worker


def test_prompts_for_worker_splits_any_list():
    prompts = [f"p{i}" for i in range(10)]
    a, b, c = (prompts_for_worker(prompts, w, 3) for w in range(3))
    assert sorted(a + b + c) == sorted(prompts)
    assert not (set(a) & set(b)) and not (set(b) & set(c)) and not (set(a) & set(c))


def test_bad_requests():
    gen = SyntheticPrompts(0)
    with pytest.raises(ValueError, match="distinct prompts"):
        gen.generate(gen.num_combinations // 2 + 1, worker_id=0, num_workers=2)
    with pytest.raises(ValueError, match="worker_id"):
        gen.generate(3, worker_id=2, num_workers=2)
    with pytest.raises(ValueError, match="worker_id"):
        prompts_for_worker(["a"], 0, 0)
    with pytest.raises(ValueError, match="outside"):
        gen.prompt(gen.num_combinations)
