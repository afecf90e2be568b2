"""collm.py: the CoLLM model (paper section 3): an LLM that answers "Yes"/"No", LoRA, and the
collaborative-embedding projector ("CIE") whose outputs are spliced into the prompt.

    score(user, item) = < h_last , W_lm["Yes"] >

where h_last is the LLM's final hidden state at the last prompt token ("#Answer:") and W_lm["Yes"]
is the language-model head's row for the token "Yes". Stage 1 (TALLRec) trains LoRA adapters on
text-only prompts; stage 2 feeds the collaborative embeddings of the user and the item, mapped by a
small MLP into the LLM's token-embedding space, in place of two slot tokens of the prompt.

It is handed an LLM (backbone.py loads one), a collaborative model (anything with `.dim`, `.his_len`
and one per-row call `.embed(uid, iid, his) -> (user vectors, item vectors)`, see collab.py) and token
batches (see data.py), and builds none of them itself: checkpoint.build_model does, for each stage.
"""
import torch
import torch.nn as nn

import backbone
from prepare import UsageError

# ---------------------------------------------------------------------------------------------
# The answer token and the adapters


def yes_token_id(tokenizer):
    """The id of "Yes" (LLaMA 3869, Qwen2 9454). The score is this one token's logit, so a tokenizer
    that splits "Yes" into pieces cannot be used."""
    ids = tokenizer.encode("Yes", add_special_tokens=False)
    if len(ids) != 1:
        raise UsageError(f"tokenizer splits 'Yes' into {len(ids)} tokens {ids}; CoLLM scores a single 'Yes' token")
    return ids[0]


def add_lora(llm, r=8, alpha=16, dropout=0.05, targets=("q_proj", "v_proj"), top_layers=0):
    """Wrap the LLM with peft LoRA adapters (the paper's r=8, alpha=16 on q and v projections of
    every layer). peft keeps adapter weights in fp32 even when the base model is bf16/fp16.

    top_layers=k > 0 puts adapters in the top k decoder layers only. Nothing below them is then
    trained, so autograd never runs the backward through the lower layers: they cost a forward
    pass only (2N per token instead of 4N)."""
    from peft import LoraConfig, get_peft_model
    n = llm.config.num_hidden_layers
    layers = list(range(n - top_layers, n)) if 0 < top_layers < n else None  # None = every layer
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), bias="none",
                     layers_to_transform=layers)
    try:
        return get_peft_model(llm, cfg)
    except ValueError as e:
        raise UsageError(f"--lora-targets {','.join(targets)}: {str(e).splitlines()[0]}")


# ---------------------------------------------------------------------------------------------
# The model

# The decoders whose forward backbone.decode_after_prefix repeats step by step (config.model_type);
# any other LLM runs every prompt in one call: the same numbers, more compute.
PREFIX_DECODERS = ("llama", "qwen2", "gemma3_text")


class CoLLM(nn.Module):
    """LLM (+LoRA) scoring Yes, optionally with collaborative embeddings in two prompt slots.

    rec=None is stage 1 (TALLRec): no projector exists, nothing collaborative runs.
    With a rec model, `proj` maps its d-dim vectors to the LLM's hidden size H:
        Linear(d, 10d) -> ReLU -> Linear(10d, H), one MLP shared by users and items, kept in fp32.
    The rec model answers one call per batch, rec.embed(uid, iid, his) -> (user (B, d), item (B, d)):
    MF / LightGCN look the ids up (a frozen one computes its tables once, see collab.frozen_once);
    SASRec and DIN read the row's history `his` too, so their vectors are computed per row, every step
    (the reference's `all_encode`). Frozen (tune_rec=False), the rec model stays in eval mode even while
    CoLLM trains: no dropout, and DIN's BatchNorm keeps the statistics it was trained with."""

    def __init__(self, llm, yes_id, rec=None, tune_rec=False):
        super().__init__()
        self.llm = llm
        self.yes_id = yes_id
        self.rec = rec
        self.tune_rec = tune_rec
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
        """(B,) ids (+ (B, L) history ids for SASRec / DIN) -> the projected user and item vectors,
        (B, H) each, in fp32."""
        with torch.autocast(uid.device.type, enabled=False):  # the rec model and the projector stay fp32
            u, i = self.rec.embed(uid, iid, his)
            return self.proj(u.float()), self.proj(i.float())

    def fill_slots(self, embed, rows, slots, uid, iid, his):
        """Stage 2: the token embeddings (B, T, H) with the two slots replaced by the projected user
        and item vectors."""
        u, i = self.collab_tokens(uid, iid, his)
        embed = embed.index_put((rows, slots[:, 0]), u.to(embed.dtype))  # out of place: autograd-safe
        return embed.index_put((rows, slots[:, 1]), i.to(embed.dtype))

    def forward(self, input_ids, last, slots=None, uid=None, iid=None, his=None, shared=None, prefix=None, **unused):
        """-> (B,) fp32 Yes-logits. input_ids (B, T) right-padded, last (B,) index of the last real
        token, slots (B, 2) positions of <UserID> and <TargetItemID> (stage 2), his (B, L) the
        history ids a SASRec / DIN rec model reads, shared (B,) how many leading tokens of each row
        do not depend on the target item (data.encode_split). prefix: a PromptPrefix (run_prefix)
        that every row begins with; its positions are then not run again, only each row's rest."""
        embed = self.llm.get_input_embeddings()(input_ids)  # (B, T, H)
        rows = torch.arange(len(input_ids), device=input_ids.device)
        if self.rec is not None:
            embed = self.fill_slots(embed, rows, slots, uid, iid, his)
        # Right padding + causal attention: no real token ever attends to a pad (pads come after it),
        # so no padding mask is needed, and the attention kernel takes its fast causal path.
        decoder = self.llm.get_base_model().get_decoder()
        split = self.prefix_split(slots, shared)
        if prefix is not None:  # one prompt prefix run before (run_prefix): every row continues it
            hidden = backbone.decode_rest(decoder, embed, prefix)
            last = last - prefix.length
        elif split == 0:
            hidden = decoder(inputs_embeds=embed, use_cache=False).last_hidden_state
        else:
            hidden = backbone.decode_after_prefix(decoder, embed, split)
            last = last - split
        h_last = hidden[rows, last].float()                  # (B, H)
        head = self.llm.get_output_embeddings()
        score = h_last @ head.weight[self.yes_id].float()   # (B,) one row of the LM head, not the vocabulary
        if getattr(head, "bias", None) is not None:
            score = score + head.bias[self.yes_id].float()
        return score + self.score_bias

    # -----------------------------------------------------------------------------------------
    # Paying only for what is trained and what differs (backbone.py's shared-prefix section): positions
    # whose keys and values do not depend on what is trained, or are the same for many rows, run once.
    # Stage 1 training trains LoRA in every position, so it runs the whole prompt in one call.

    def shares_prefixes(self):
        """Whether prompt prefixes may run apart: on unless bench.py turned it off, and only for the
        decoders whose forward decode_after_prefix repeats (others run every prompt in one call)."""
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
    # One user's catalog (train.py --evaluate --user U --candidates unseen): thousands of rows that all
    # begin with the same prompt up to the target title (one user, one history). decode_after_prefix
    # (backbone.py) would rerun that prefix in every batch; here it runs once, all layers' keys and values are kept
    # (one prompt's worth: about 9 MB on SmolLM2), and each batch runs only its rows' own tokens.

    def run_prefix(self, first, p, uid=None, iid=None, his=None):
        """-> a PromptPrefix: the keys and values of the first p positions of the batch `first`'s
        row 0, for rows that all begin with those tokens. uid, iid, his: every row that will read it
        (stage 2). A user vector that depends on the target item (DIN pools the history by it) makes
        the user slot differ from row to row: the prefix then stops before that slot."""
        decoder = self.llm.get_base_model().get_decoder()
        embed = self.llm.get_input_embeddings()(first["input_ids"][:1])
        if self.rec is not None:
            u, _ = self.collab_tokens(uid, iid, his)
            if not bool((u == u[:1]).all()):
                p = min(p, int(first["slots"][0, 0]))
            embed = self.fill_slots(embed, torch.zeros(1, dtype=torch.long, device=embed.device), first["slots"][:1],
                                    first["uid"][:1], first["iid"][:1], first["his"][:1] if "his" in first else None)
        return backbone.run_prefix(decoder, embed[:, :p])
