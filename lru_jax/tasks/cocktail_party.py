"""The cocktail-party task: follow one speaker in a conversation where several talk in turns."""

from __future__ import annotations

import math

import numpy as np

from lru_jax import _checks
from lru_jax.tasks.base import TaskSpec, check_batch_args, check_split, split_rng
from lru_jax.tasks.seq2seq import EOS, NUM_SPECIAL, SPECIAL_TOKENS, teacher_forcing

# Heatmap tints of the speakers (matplotlib colour names), cycled past six.
SPEAKER_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")


class CocktailParty:
    """Several sources speak in turns into one sequence; a cue names the one to transcribe.

    Sources. Each of the K = num_sources sources is its own Markov chain: source k speaks
    tokens of its alphabet, the `num_shared` symbols every source uses plus `num_private`
    symbols of its own; its first token is uniform over its alphabet and each next one is
    uniform over `branching` successors of the previous token, a successor table drawn once
    per source from `seed` (`successors[k]`). Every source says exactly `tokens_per_source`
    tokens.

    Mixture. Each source's utterance is cut into bursts of 1..max_burst tokens; the bursts of
    all sources are shuffled and concatenated, so speakers take turns at random points and
    each resumes its own chain where it stopped. Which speaker said a token is never given:
    shared symbols are ambiguous on their own, and the model has to segment the mixture from
    context (private symbols nearby, which successions are possible in which chain).

    Tokens: 0 PAD, 1 BOS, 2 EOS, cues 3 .. 3 + K - 1, then the symbols: shared first, then
    each source's private ones. With M = tokens_per_source:

        inputs:   cue_k  x_1 .. x_{K M}          (src_len K M + 1, lengths all K M + 1)
        targets:  source k's M tokens in order, EOS   (target_len M + 1; see `seq2seq`)
        speakers: int32 [batch, K M], the source of each mixture step (for inspection only)

    Baseline: the best decoder that sees the cue but not the mixture knows the chains and
    scores H(target | cue) / (M + 1) = (log |alphabet| + (M - 1) log branching) / (M + 1)
    nats per step. Splits are infinite.
    """

    def __init__(
        self,
        num_sources: int = 3,
        tokens_per_source: int = 8,
        num_private: int = 4,
        num_shared: int = 2,
        branching: int = 2,
        max_burst: int = 4,
        seed: int = 0,
    ):
        self.num_sources = _checks.integer("num_sources", num_sources, 2)
        self.tokens_per_source = _checks.integer("tokens_per_source", tokens_per_source, 1)
        self.num_private = _checks.integer("num_private", num_private, 1)
        self.num_shared = _checks.integer("num_shared", num_shared, 0)
        self.alphabet_size = self.num_private + self.num_shared
        self.branching = _checks.integer("branching", branching, 1, self.alphabet_size)
        self.max_burst = _checks.integer("max_burst", max_burst, 1, self.tokens_per_source)
        self.seed = _checks.integer("seed", seed, 0)
        self.alphabets = [self._alphabet(k) for k in range(self.num_sources)]
        self.successors = self._successor_tables()
        m, k = self.tokens_per_source, self.num_sources
        vocab = NUM_SPECIAL + k + self.num_shared + k * self.num_private
        entropy = math.log(self.alphabet_size) + (m - 1) * math.log(self.branching)
        self.spec = TaskSpec(
            name="cocktail_party",
            kind="seq2seq",
            seq_len=k * m + 1,
            target_len=m + 1,
            num_outputs=vocab,
            vocab_size=vocab,
            baseline=entropy / (m + 1),
            baseline_metric="loss",
            special_tokens=SPECIAL_TOKENS,
        )

    def cue(self, source: int) -> int:
        return NUM_SPECIAL + source

    def _alphabet(self, source: int) -> np.ndarray:
        """Token ids int64 [num_shared + num_private] that `source` speaks."""
        first = NUM_SPECIAL + self.num_sources
        private = first + self.num_shared + source * self.num_private
        return np.concatenate(
            [
                np.arange(first, first + self.num_shared),
                np.arange(private, private + self.num_private),
            ]
        )

    def _successor_tables(self) -> np.ndarray:
        """Indices into each alphabet: int64 [K, alphabet, branching]; row a lists the possible
        next tokens after alphabet[a]."""
        rng = np.random.default_rng([self.seed, 7_919])
        shape = (self.num_sources, self.alphabet_size, self.alphabet_size)
        return rng.random(shape).argsort(axis=-1)[..., : self.branching]

    def num_examples(self, split: str) -> int | None:
        check_split(split)
        return None

    def _utterances(self, rng, batch_size: int) -> np.ndarray:
        """Every source's tokens: int32 [batch, K, M] (ids, not alphabet indices)."""
        k, m = self.num_sources, self.tokens_per_source
        state = rng.integers(0, self.alphabet_size, (batch_size, k))
        picks = rng.integers(0, self.branching, (batch_size, k, m))
        states = [state]
        for t in range(1, m):
            state = self.successors[np.arange(k)[None, :], state, picks[:, :, t]]
            states.append(state)
        index = np.stack(states, axis=-1)  # [batch, K, M]
        alphabets = np.stack(self.alphabets)  # [K, alphabet]
        return np.take_along_axis(alphabets[None], index, axis=2).astype(np.int32)

    def _turns(self, rng) -> np.ndarray:
        """One conversation's speaker order: int32 [K M], each source M times, in bursts."""
        bursts = []
        for source in range(self.num_sources):
            left = self.tokens_per_source
            while left:
                size = min(int(rng.integers(1, self.max_burst + 1)), left)
                bursts.append(np.full(size, source, np.int32))
                left -= size
        order = rng.permutation(len(bursts))
        return np.concatenate([bursts[i] for i in order])

    def batch(self, split: str, index: int, batch_size: int) -> dict[str, np.ndarray]:
        """Returns inputs int32 [batch_size, K M + 1], lengths, decoder_inputs, targets and
        mask [batch_size, M + 1], speakers int32 [batch_size, K M] and cued_source int32
        [batch_size]."""
        index, batch_size = check_batch_args(index, batch_size)
        rng = split_rng(self.seed, split, index)
        k, m = self.num_sources, self.tokens_per_source
        said = self._utterances(rng, batch_size)
        speakers = np.stack([self._turns(rng) for _ in range(batch_size)])
        # The j-th time source s speaks it says said[s, j].
        nth = np.zeros_like(speakers)
        for s in range(k):
            mine = speakers == s
            nth[mine] = (np.cumsum(mine, axis=1) - 1)[mine]
        rows = np.arange(batch_size)[:, None]
        mixture = said[rows, speakers, nth]
        cued = rng.integers(0, k, batch_size).astype(np.int32)
        inputs = np.concatenate([(NUM_SPECIAL + cued)[:, None], mixture], axis=1)
        lengths = np.full(batch_size, m, np.int32)
        out = teacher_forcing(said[np.arange(batch_size), cued], lengths, m + 1)
        return {
            "inputs": inputs.astype(np.int32),
            "lengths": np.full(batch_size, k * m + 1, np.int32),
            **out,
            "speakers": speakers,
            "cued_source": cued,
        }

    # What `lru_jax.attention_maps` shows and reports beside the weights for this task.

    def attention_summary(self, weights, batch) -> dict[str, float]:
        """How much attention falls on the cued speaker.

        weights [batch, T, S] of a decoder over `batch` (a batch of this task; S = 1 + K M,
        step 0 is the cue). attention_on_cued_speaker: the mean weight on the cued speaker's
        mixture steps over the output steps that emit a word (not EOS);
        cued_speaker_share_of_steps: what attending uniformly would give.
        """
        on_cued = batch["speakers"] == batch["cued_source"][:, None]  # [batch, S - 1]
        steps = (batch["mask"] > 0) & (batch["targets"] != EOS)  # [batch, T]
        share = np.sum(np.asarray(weights)[:, :, 1:] * on_cued[:, None, :], axis=-1)  # [batch, T]
        return {
            "attention_on_cued_speaker": float(share[steps].mean()),
            "cued_speaker_share_of_steps": float(on_cued.mean()),
        }

    def source_annotations(self, batch) -> list[tuple[list[str | None], str]]:
        """Per example: a colour for each source step (its true speaker, which the model never
        sees; None for the cue) and a caption for its heatmap."""
        out = []
        for speakers, cued in zip(batch["speakers"], batch["cued_source"], strict=True):
            colours = [None] + [SPEAKER_COLOURS[int(s) % len(SPEAKER_COLOURS)] for s in speakers]
            out.append((colours, f"cue: speaker {int(cued)}, tick colours: true speaker"))
        return out
