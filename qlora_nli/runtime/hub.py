"""One quick question to the Hugging Face Hub before a long download: offline, `from_pretrained` and `load_dataset`
each retry for tens of seconds and print many lines before they fail, while one probe fails in well under that."""
import logging

log = logging.getLogger(__name__)


OK, OFFLINE, GATED, NOT_FOUND, UNREACHABLE = "ok", "offline", "gated", "not found", "unreachable"


def refusal(status, kind, where, name, not_found_fix):
    """The one-line message for a Hub repository that `probe` found GATED or NOT_FOUND, else None. `kind`: "model" or
    "dataset"; `where`: the param it came from; `not_found_fix`: what follows "... on the Hugging Face Hub"."""
    if status == GATED:
        return (f"{where}: '{name}' is a gated {kind}; accept its terms on the Hub and log in (hf auth login), or use "
                f"a local copy")
    if status == NOT_FOUND:
        return f"{where}: '{name}' is neither a local directory nor a {kind} on the Hugging Face Hub{not_found_fix}"
    return None


def probe(repo_id, repo_type):
    """OK, GATED, NOT_FOUND or UNREACHABLE for `repo_id` ("model" or "dataset"); OFFLINE when HF_HUB_OFFLINE is
    set, where the caller should rely on the local cache instead of asking."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if constants.HF_HUB_OFFLINE:
        return OFFLINE
    try:
        HfApi().repo_info(repo_id, repo_type=repo_type, timeout=10)
    except GatedRepoError:
        return GATED
    except RepositoryNotFoundError:
        return NOT_FOUND
    except Exception as e:  # DNS failure, refused connection, timeout, proxy: all mean "no Hub"
        log.info("Hub probe for %s failed: %s: %s", repo_id, type(e).__name__, " ".join(str(e).split())[:200])
        return UNREACHABLE
    return OK
