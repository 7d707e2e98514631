"""Warnings about scam.conf keys that contradict, outrun or do nothing without one another."""

from __future__ import annotations

import ipaddress


def cross_key_warnings(path: str, values: dict, seen: dict, verify_timeout: float) -> list[str]:
    """"file:line: why" for each key whose value another key (or its absence) undoes
    (verify_timeout: BackVerifyTimeout's default)."""
    warnings: list[str] = []

    def warn(fieldname: str, text: str) -> None:
        warnings.append(f"{path}:{seen[fieldname]}: {text}")

    listen = values.get("stats_listen")
    if listen is not None and not ipaddress.ip_address(listen[0]).is_loopback:
        warn("stats_listen", f"StatsListen {listen[0]} is not a loopback address: anyone who can "
             "reach it reads the statistics")
    if "cache_password_file" in values and "shared_cache" not in values:
        warn("cache_password_file", "BackCachePasswordFile is used only with BackCache: redis://...")
    if "tls_ca_file" in values and values.get("tls", "no") != "verify":
        warn("tls_ca_file", "BackTLSCAFile is used only with BackTLS: verify (may checks no "
             "certificate)")
    if "mailertable" in values and not values.get("use_mailertable"):
        warn("mailertable", "Mailertable is read only with UseMailertable: yes (the original's "
             "USEMAILERTABLE build); add that line to verify the mailertable's domains")
    limit = values.get("verify_timeout", verify_timeout)
    for fieldname, name in (("timeout_connect", "TimeoutSMTPConnect"),
                            ("timeout_reply", "TimeoutSMTPReply")):
        if fieldname in values and values[fieldname] >= limit:
            warn(fieldname, f"{name} {values[fieldname]:g} s is cut short by BackVerifyTimeout "
                 f"{limit:g} s, the limit for a whole verification: raise BackVerifyTimeout too "
                 "(and keep it below the MTA's milter timeout)")
    return warnings
