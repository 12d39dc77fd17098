"""Batched sampling from a chat model behind one interface: `generate(conversations, cfg, n, seeds)`.

Two engines. `hf` (default) is transformers' `generate` with left padding and a KV cache, every prompt
and sample of a call batched together (packed by a token budget). `vllm` is used when vllm is importable
and CUDA is present (or when asked for). Prompts are rendered with the model's chat template and the
generation prompt, and tokenised once, so both engines see the same token ids.

Reproducibility: every output row has its own seed, and in the hf engine its own torch.Generator that
does the sampling (a logits processor samples and hands generate a one-hot choice). A row's text
therefore depends on its conversation and seed, not on its batch mates, the batch size or the order of
rows (up to float rounding of padded batches); reruns are identical. Temperature 0 is greedy."""

from __future__ import annotations

import torch

from curate import chat, logprobs, models
from curate.io.atomic import stable_hash
from curate.batching import left_pad, token_batches
from curate.stages.configs import GenerationConfig, resolve_engine

# What a per-record check lets through: errors that are never one record's (curate.chat's, and a model
# folder that cannot be loaded: the files' fault), so they stop the run instead of quarantining records.
NOT_RECORD_ERRORS = (*chat.NOT_RECORD_ERRORS, models.ModelError)


def template_problem(cfg: GenerationConfig, conversation: list[dict], tools: list[dict] | None = None,
                     reply: dict | None = None) -> str | None:
    """Why the generator's chat template refuses to render this prompt (or the prompt and `reply`), or
    its tokenizer the rendered prompt, as a quarantine reason ("chat template: ...", "tokenizer: ...",
    `chat.record_error`); None when both go through. Checked before generating, so one refused record is
    quarantined instead of stopping the batch: whatever the template or tokenizer raises on it (a
    sandbox SecurityError, a TypeError, a RecursionError...), except errors that are never a record's
    (`NOT_RECORD_ERRORS`: out of memory, the model's files), which stop the run."""
    tok = models.load_tokenizer(models.resolve(cfg.model, cfg.trust_remote_code))
    try:
        text = chat.render(tok, conversation, generation_prompt=True, tools=tools)
        try:
            text.encode("utf-8")  # a lone surrogate: the tokenizer's own error would not say so
            tok(text, add_special_tokens=False)  # as `generate` tokenises it (logprobs.prompt_ids)
        except NOT_RECORD_ERRORS:
            raise
        except Exception as e:  # noqa: BLE001
            raise chat.TokenizerError(f"tokenizer: {type(e).__name__}: {e}") from e
        if reply is not None:
            chat.render(tok, [*conversation, reply], tools=tools)
    except NOT_RECORD_ERRORS:
        raise
    except Exception as e:  # noqa: BLE001 - anything raised on this record is its quarantine reason
        return chat.record_error(e)
    return None


def row_seed(*parts) -> int:
    """A 63-bit seed from anything hashable to JSON (e.g. base seed, record id, sample, turn)."""
    return int(stable_hash(list(parts))[:15], 16)


def generate(conversations: list[list[dict]], cfg: GenerationConfig, n: int = 1,
             seeds: list[int] | None = None, tools: list[list[dict] | None] | None = None) -> list[list[str]]:
    """n sampled replies (assistant text) for each conversation. `seeds` gives each conversation a
    base seed (sample j uses row_seed(base, j)); by default it is derived from cfg.seed and the text.
    `tools`: each conversation's function schemas (a list, or None), rendered into its prompt."""
    ref = models.resolve(cfg.model, cfg.trust_remote_code)
    tok = models.load_tokenizer(ref)
    tools = tools if tools is not None else [None] * len(conversations)
    texts = [chat.render(tok, c, generation_prompt=True, tools=t) for c, t in zip(conversations, tools)]
    if seeds is None:
        seeds = [row_seed(cfg.seed, t) for t in texts]
    if len(seeds) != len(conversations):
        raise ValueError(f"{len(seeds)} seeds for {len(conversations)} conversations")
    ids = [logprobs.prompt_ids(tok, c, t) for c, t in zip(conversations, tools)]   # the ids scoring uses too
    rows = [(i, row_seed(s, j) if n > 1 else s) for i, s in enumerate(seeds) for j in range(n)]
    engine = resolve_engine(cfg)
    run = _generate_vllm if engine == "vllm" else _generate_hf
    flat = run(ref, [ids[i] for i, _ in rows], [s for _, s in rows], cfg) if rows else []
    return [flat[i * n:(i + 1) * n] for i in range(len(conversations))]


class RowSampler:
    """A logits processor that samples each row with its own generator (temperature, then top-p) and
    returns a one-hot score, so that generate's greedy step takes exactly that token."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float):
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.temperature, self.top_p = temperature, top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(scores.float().cpu() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            probs = torch.stack([nucleus(p, self.top_p) for p in probs])
        # inverse-CDF sampling, one uniform per row from the row's generator (torch.multinomial is ~20x
        # slower over a 50k vocabulary); a zero-probability token has an empty interval and is never hit
        u = torch.cat([torch.rand(1, generator=g) for g in self.generators])
        cdf = torch.cumsum(probs, dim=-1)
        chosen = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)
        chosen = chosen.clamp(max=probs.shape[-1] - 1)
        out = torch.full_like(scores, float("-inf"))
        out[torch.arange(len(out)), chosen.to(out.device)] = 0.0
        return out


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches top_p (at least one)."""
    if top_p >= 1.0:
        return probs
    sorted_p, order = torch.sort(probs, descending=True)
    before = torch.cumsum(sorted_p, 0) - sorted_p   # mass of strictly more likely tokens
    sorted_p[before >= top_p] = 0.0
    return torch.zeros_like(probs).scatter_(0, order, sorted_p)


def _generate_hf(ref: models.ModelRef, ids: list[list[int]], seeds: list[int], cfg: GenerationConfig) -> list[str]:
    from transformers import GenerationConfig as HFGenerationConfig
    from transformers import LogitsProcessorList

    tok = models.load_tokenizer(ref)
    device = models.resolve_device(cfg.device)
    model = models.load_model(ref, device)
    stops = _stop_ids(tok)
    # Explicit values: the model's own generation_config only fills fields left unset.
    gen = HFGenerationConfig(max_new_tokens=cfg.max_new_tokens, do_sample=False, num_beams=1,
                             repetition_penalty=1.0, eos_token_id=stops, pad_token_id=tok.pad_token_id)
    out: list[str | None] = [None] * len(ids)
    for batch in token_batches([len(x) + cfg.max_new_tokens for x in ids], cfg.batch_tokens):
        input_ids, attention = left_pad([ids[b] for b in batch], tok.pad_token_id, device)
        procs = LogitsProcessorList()
        if cfg.temperature > 0:
            procs.append(RowSampler([seeds[b] for b in batch], cfg.temperature, cfg.top_p))
        with torch.inference_mode():
            seqs = model.generate(input_ids=input_ids, attention_mask=attention, generation_config=gen,
                                  logits_processor=procs)
        for b, row in zip(batch, seqs[:, input_ids.shape[1]:].tolist()):
            out[b] = _decode(tok, row, stops)
    return out


def _stop_ids(tok) -> list[int]:
    """End of sequence and the chat template's end of turn, where they differ."""
    ids = {tok.eos_token_id}
    for t in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
        i = tok.convert_tokens_to_ids(t)
        if isinstance(i, int) and i != tok.unk_token_id and i is not None and i >= 0:
            ids.add(i)
    return sorted(i for i in ids if i is not None)


def _decode(tok, row: list[int], stops: list[int]) -> str:
    cut = next((k for k, t in enumerate(row) if t in stops), len(row))
    return tok.decode(row[:cut], skip_special_tokens=True).strip()


@models.cached_while_unchanged(maxsize=1)
def _vllm_engine(ref: models.ModelRef):
    """One vLLM engine per process. A GGUF needs an HF tokenizer folder: we save the one we load."""
    import tempfile

    from vllm import LLM

    if ref.gguf_file:
        folder = tempfile.mkdtemp(prefix="curate-tok-")
        models.load_tokenizer(ref).save_pretrained(folder)
        return LLM(model=f"{ref.folder}/{ref.gguf_file}", tokenizer=folder, seed=0)
    return LLM(model=ref.folder, seed=0, trust_remote_code=ref.trust_remote_code)


def _generate_vllm(ref: models.ModelRef, ids: list[list[int]], seeds: list[int], cfg: GenerationConfig) -> list[str]:
    from vllm import SamplingParams

    tok = models.load_tokenizer(ref)
    stops = _stop_ids(tok)
    params = [SamplingParams(n=1, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_new_tokens,
                             seed=s % (2**31), stop_token_ids=stops) for s in seeds]
    prompts = [{"prompt_token_ids": x} for x in ids]
    results = _vllm_engine(ref).generate(prompts, params, use_tqdm=False)
    return [_decode(tok, list(r.outputs[0].token_ids), stops) for r in results]
