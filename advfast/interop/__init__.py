"""Interoperability with the published robust-SSL code bases and the RobustSSL benchmark.

    encoder, meta = load_published("ACL_DS.pt", "acl")           # their checkpoint -> advfast encoder
    export_run_to_robustssl("runs/acl", "acl_robustssl.pt")      # advfast run -> the benchmark's layout

Formats (``FORMATS``): acl, dynacl, advcl, a-infonce, deacl, solo-learn, rocl, amoc, robustssl.
Loading never unpickles arbitrary objects (see :mod:`advfast.interop.safe_unpickle`); every failure is
an :class:`InteropError` (a ValueError: one line, exit code 2 in the CLIs).
"""

from advfast.interop.errors import InteropError
from advfast.interop.export import check_exportable, export_run_to_robustssl, robustssl_state_dict, save_robustssl
from advfast.interop.formats import FORMATS, PublishedFormat, get_format
from advfast.interop.load import load_published

__all__ = ["FORMATS", "InteropError", "PublishedFormat", "check_exportable", "export_run_to_robustssl",
           "get_format", "load_published", "robustssl_state_dict", "save_robustssl"]
