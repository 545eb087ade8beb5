"""What every command shares: errors and exit codes, files written atomically, prompt files and manifests, devices,
and the stop signals. The model, the reward and the trainer all build on it; it imports none of them."""

import hashlib
import io
import json
import os
import signal
import sys
import tempfile
import time

import torch

# ----------------------------------------------------------------------------------------------------------------
# Errors: one line on stderr and an exit code that says which (README, "Exit codes")

class InputError(Exception):
    """Bad user input (a missing file, a wrong key or shape, a bad flag): srpo.py prints it on one line, exit 2."""


def first_line(error):
    """The first line of an exception's message, for one-line errors."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


EXIT_INPUT = 2  # bad input: nothing was done
EXIT_FAULT = 74  # EX_IOERR (sysexits.h): a write failed under the run; the last complete checkpoint is intact
EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped by SIGTERM / SIGINT after saving; run it again (with --resume) to continue


class Fault(Exception):
    """A write that failed under the run: disk full, quota, permissions changed, a vanished mount."""


class Stopped(Exception):
    """SIGTERM or SIGINT: the run stopped cleanly, where it can continue."""


def written(what, write):
    """write(), with an OSError turned into a Fault naming what could not be written and why."""
    try:
        return write()
    except OSError as e:
        raise Fault(f"could not write {what} ({e.strerror or e})") from None


# ----------------------------------------------------------------------------------------------------------------
# Files: written atomically, with the umask's mode; JSON; folders

def check_folder(path, what):
    if not os.path.isdir(path):
        raise InputError(f"{path}: no such folder (expected {what})")


def read_json(path):
    """A JSON object (dict) from path; anything else is a one-line error."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read it ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise InputError(f"{path}: expected a JSON object, found {type(obj).__name__}")
    return obj


def new_file_mode():
    """0o666 & ~umask, the mode open() gives a new file. The umask can only be read by setting it: the moment between
    the two calls sets a stricter one, never a looser."""
    umask = os.umask(0o077)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path, write):
    """write(tmp) then rename tmp to path, both flushed to disk first: after a crash or a power loss, path holds
    the old file or the whole new one, never a part. The file gets the umask's mode (safetensors writes 0600), so
    that a checkpoint can be shared like any other file."""
    tmp = path + ".tmp"
    try:
        write(tmp)
        os.chmod(tmp, new_file_mode())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):  # the write failed: leave no half file behind
            os.remove(tmp)
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself
    finally:
        os.close(fd)


def write_text(path, text):
    """A UTF-8 text file, written atomically."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2))


def check_writable(out):
    """Make the output folder and try a file in it, before anything is loaded."""
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out):
            pass
    except OSError as e:
        raise InputError(f"{out}: cannot write the output folder ({e.strerror or e})") from None


# ----------------------------------------------------------------------------------------------------------------
# Prompt files and the manifests of `sample --prompts`

MANIFEST = "images.jsonl"  # in a `sample --prompts` folder: every image with its prompt


def read_lines(path, what):
    """The lines of a UTF-8 text file (LF, CRLF or CR; a Windows editor's byte-order mark dropped). A file that
    cannot be read, or is not UTF-8 (Latin-1, an image), is a one-line error naming the file and the first bad
    byte, by offset and line."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise InputError(f"{path}: cannot read the {what} ({e.strerror or e})") from None
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise InputError(f"{path}: the {what} is not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start}, "
                         f"line {line}): save it as UTF-8") from None
    return list(io.StringIO(text, newline=None))


def read_prompts(path):
    """One prompt per line; blank lines skipped."""
    prompts = [line.strip() for line in read_lines(path, "prompt file") if line.strip()]
    if not prompts:
        raise InputError(f"{path}: no prompts (expected one prompt per line)")
    return prompts


def write_manifest(folder, jobs, seed):
    """folder/images.jsonl: one {"image", "prompt", "seed"} line per image, what `score --manifest` reads."""
    write_text(os.path.join(folder, MANIFEST), "".join(
        json.dumps({"image": os.path.basename(path), "prompt": p, "seed": seed}) + "\n"
        for p, paths in jobs for path in paths))


def read_manifest(path):
    """(image paths, prompts) from a `sample --prompts` folder's images.jsonl, paths relative to its folder."""
    folder, paths, prompts = os.path.dirname(os.path.abspath(path)), [], []
    for number, line in enumerate(read_lines(path, "manifest"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            paths.append(os.path.join(folder, row["image"]))
            prompts.append(str(row["prompt"]))
        except (ValueError, KeyError, TypeError):
            raise InputError(f"{path}, line {number}: expected a JSON object with \"image\" and \"prompt\"") from None
    return paths, prompts


# ----------------------------------------------------------------------------------------------------------------
# Devices, seeds, stop signals

def parse_device(name):
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"unknown device {name!r}: expected cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {name!r} requested but CUDA is not available here")
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"unsupported device {name!r}: expected cpu, cuda or cuda:N")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise InputError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name, device):
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise InputError(f"unknown dtype {name!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


def derive_seed(seed, *keys):
    """A 63-bit seed for the stream named by keys: the same numbers on every rank and after a resume."""
    digest = hashlib.sha256(repr((seed, *keys)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def to_device(t, device):
    """t copied to device without stalling the host: asynchronously, from pinned memory, on CUDA."""
    return (t.pin_memory() if device.type == "cuda" else t).to(device, non_blocking=True)


def this_process(device_name):
    """(rank, world, device): torchrun's RANK and WORLD_SIZE (0 and 1 without it), and on CUDA under torchrun the
    GPU of this process's LOCAL_RANK."""
    device = parse_device(device_name)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return rank, world, device


def attention_backend(name, device):
    """--attn, by default the Triton kernels on CUDA and torch's SDPA elsewhere."""
    return name or ("triton" if device.type == "cuda" else "sdpa")


class StopSignals:
    """While active, the first SIGTERM or SIGINT only sets `received`: the loop finishes its step (or image), saves
    and raises Stopped. A second signal stops at once. A scheduler signals the whole process group and torchrun
    then forwards the same signal to its workers, so a worker gets it twice within moments: repeats within
    REPEAT_S seconds count as one."""

    REPEAT_S = 2.0

    def __init__(self):
        self.received, self.at = None, 0.0

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def handle(self, signum, frame):
        if self.received is None:
            self.received, self.at = signal.Signals(signum).name, time.monotonic()
            print(f"\n{self.received}: stopping at the end of this step (a second signal stops at once)",
                  file=sys.stderr)
        elif time.monotonic() - self.at > self.REPEAT_S:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
