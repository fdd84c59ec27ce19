"""Built-in synthetic prompts: templates over subjects, attributes and contexts (DESIGN.md section 3).

When no data source is given, the trainer lets the teacher generate its training latents from these
prompts. A prompt is one combination ``(template, subject, attribute, context)``; the combinations are
numbered ``0 .. num_combinations - 1`` and a seed picks a pseudo-random sample of distinct numbers
without replacement. Worker ``w`` of ``W`` takes every ``W``-th pick starting at ``w``, so workers (or
processes) with the same seed never repeat each other, and the same seed always gives the same prompts.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

# Every template uses all three slots, so distinct combinations give distinct strings.
TEMPLATES: tuple[str, ...] = (
    "a photo of {attribute} {subject} {context}",
    "{attribute} {subject} {context}, highly detailed",
    "a painting of {attribute} {subject} {context}",
    "a close-up photograph of {attribute} {subject} {context}, soft light",
    "an illustration of {attribute} {subject} {context}",
    "a watercolor of {attribute} {subject} {context}",
    "a cinematic shot of {attribute} {subject} {context}, 35mm film",
    "a digital render of {attribute} {subject} {context}",
)

SUBJECTS: tuple[str, ...] = (
    "cat", "dog", "fox", "owl", "horse", "rabbit", "deer", "wolf", "bear", "parrot",
    "lighthouse", "castle", "cottage", "bridge", "windmill", "tower", "temple", "train station",
    "sailboat", "bicycle", "vintage car", "hot air balloon", "steam locomotive", "robot",
    "teapot", "violin", "bowl of fruit", "vase of flowers", "stack of books", "lantern",
    "old man", "young woman", "knight", "astronaut", "chef", "dancer", "fisherman", "musician",
    "mountain", "waterfall", "oak tree", "sunflower",
)  # fmt: skip

ATTRIBUTES: tuple[str, ...] = (
    "a red", "a blue", "a golden", "a silver", "a green", "a white", "a black", "a purple",
    "an old", "a tiny", "a giant", "a glowing", "a weathered", "a shiny", "a wooden", "a glass",
    "a fluffy", "a rusty", "a colorful", "a misty", "a majestic", "a sleepy", "a cheerful",
    "a mysterious", "an elegant", "a futuristic", "an ancient", "a snow-covered", "a sunlit",
    "a moonlit",
)  # fmt: skip

CONTEXTS: tuple[str, ...] = (
    "in a forest", "on a beach", "in the desert", "on a snowy mountain", "in a busy city street",
    "in a quiet village", "by a lake", "under a starry sky", "at sunset", "at dawn", "in the rain",
    "in a field of flowers", "on a wooden table", "in a library", "in a kitchen", "in a garden",
    "on a rooftop", "in a cave", "under the sea", "in outer space", "in a meadow", "by the river",
    "in the fog", "on a cliff", "in a market", "in a greenhouse", "on a frozen lake", "in autumn",
    "in a museum", "on a country road",
)  # fmt: skip


def _check_worker(worker_id: int, num_workers: int) -> None:
    if num_workers < 1 or not 0 <= worker_id < num_workers:
        raise ValueError(
            f"worker_id must lie in [0, num_workers) with num_workers >= 1; got worker_id={worker_id}, "
            f"num_workers={num_workers}."
        )


class SyntheticPrompts:
    """Deterministic prompts from templates over subjects, attributes and contexts.

    Args:
        seed: picks which combinations come out, and in which order.
    """

    def __init__(self, seed: int = 0):
        self.seed = int(seed)

    @property
    def num_combinations(self) -> int:
        """How many distinct prompts exist (templates x subjects x attributes x contexts)."""
        return len(TEMPLATES) * len(SUBJECTS) * len(ATTRIBUTES) * len(CONTEXTS)

    def prompt(self, k: int) -> str:
        """The prompt of combination number ``k`` (mixed-radix digits over the four lists)."""
        if not 0 <= k < self.num_combinations:
            raise ValueError(f"combination number {k} is outside [0, {self.num_combinations}).")
        k, i_context = divmod(k, len(CONTEXTS))
        k, i_attribute = divmod(k, len(ATTRIBUTES))
        i_template, i_subject = divmod(k, len(SUBJECTS))
        return TEMPLATES[i_template].format(
            subject=SUBJECTS[i_subject], attribute=ATTRIBUTES[i_attribute], context=CONTEXTS[i_context]
        )

    def generate(self, n: int, worker_id: int = 0, num_workers: int = 1) -> list[str]:
        """``n`` distinct prompts for worker ``worker_id`` of ``num_workers``; disjoint across workers.

        The seed draws ``n * num_workers`` distinct combination numbers; worker ``w`` takes picks
        ``w, w + num_workers, ...``. Raises ``ValueError`` when more prompts are asked for than exist.
        """
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}.")
        _check_worker(worker_id, num_workers)
        total = n * num_workers
        if total > self.num_combinations:
            raise ValueError(
                f"{n} prompts for each of {num_workers} workers need {total} distinct prompts, but the synthetic "
                f"generator has {self.num_combinations}; ask for fewer, or pass --prompts_file."
            )
        picks = random.Random(self.seed).sample(range(self.num_combinations), total)
        return [self.prompt(k) for k in picks[worker_id::num_workers]]


def generate(n: int, seed: int = 0, worker_id: int = 0, num_workers: int = 1) -> list[str]:
    """``SyntheticPrompts(seed).generate(n, worker_id, num_workers)``."""
    return SyntheticPrompts(seed).generate(n, worker_id=worker_id, num_workers=num_workers)


def prompts_for_worker(prompts: Sequence[str], worker_id: int, num_workers: int) -> list[str]:
    """Worker ``worker_id``'s strided share ``prompts[worker_id::num_workers]`` of any prompt list.

    Use it with ``torch.utils.data.get_worker_info()`` (``.id``, ``.num_workers``) or with an
    accelerator's ``process_index`` / ``num_processes``; the shares are disjoint and cover the list.
    """
    _check_worker(worker_id, num_workers)
    return list(prompts[worker_id::num_workers])


__all__ = ["ATTRIBUTES", "CONTEXTS", "SUBJECTS", "TEMPLATES", "SyntheticPrompts", "generate", "prompts_for_worker"]
