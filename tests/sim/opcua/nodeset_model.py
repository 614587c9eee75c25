"""The official NodeSet XML files, read with xml.etree (independently of asyncua's importer
and of the server's instantiation code): type hierarchy, instance declarations with their
modelling rules, and the children an instance of a type must have.

A node is keyed by ``(namespace URI, identifier string)``, e.g.
``("http://opcfoundation.org/UA/LADS/", "i=1003")``; a BrowseName by ``(URI, name)``.
"""

from __future__ import annotations

import dataclasses
import xml.etree.ElementTree as ET
from pathlib import Path

UA_URI = "http://opcfoundation.org/UA/"
NS = {"u": "http://opcfoundation.org/UA/2011/03/UANodeSet.xsd"}

Key = tuple[str, str]

MANDATORY = (UA_URI, "i=78")
OPTIONAL = (UA_URI, "i=80")
HAS_SUBTYPE = (UA_URI, "i=45")
HAS_TYPE_DEFINITION = (UA_URI, "i=40")
HAS_MODELLING_RULE = (UA_URI, "i=37")
HAS_CHILD = (UA_URI, "i=34")
BASE_DATA_TYPE = (UA_URI, "i=24")


@dataclasses.dataclass
class XmlNode:
    key: Key
    node_class: str  # "Object", "Variable", "Method", "ObjectType", ...
    browse_name: Key
    datatype: Key | None = None
    typedef: Key | None = None
    rule: Key | None = None
    supertype: Key | None = None
    children: list[Key] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class Declaration:
    """An instance declaration: what a child with this BrowseName must be."""

    key: Key
    node_class: str
    browse_name: Key
    typedef: Key | None
    datatype: Key | None
    mandatory: bool


class NodeSetModel:
    """Every node of the given NodeSet files (Opc.Ua.NodeSet2.xml first)."""

    def __init__(self, files: list[Path]) -> None:
        self.nodes: dict[Key, XmlNode] = {}
        refs: list[tuple[Key, Key, Key]] = []  # (source, reference type, target), forward
        for path in files:
            refs.extend(self._read(path))
        subtypes_of_child = {HAS_CHILD}
        changed = True
        while changed:
            changed = False
            for src, rtype, tgt in refs:
                if (
                    rtype == HAS_SUBTYPE
                    and src in subtypes_of_child
                    and tgt not in subtypes_of_child
                ):
                    subtypes_of_child.add(tgt)
                    changed = True
        for src, rtype, tgt in refs:
            node = self.nodes.get(src)
            if node is None:
                continue
            if rtype == HAS_SUBTYPE and tgt in self.nodes:
                self.nodes[tgt].supertype = src
            elif rtype == HAS_TYPE_DEFINITION:
                node.typedef = tgt
            elif rtype == HAS_MODELLING_RULE:
                node.rule = tgt
            elif rtype in subtypes_of_child and tgt not in node.children:
                node.children.append(tgt)

    def _read(self, path: Path) -> list[tuple[Key, Key, Key]]:
        root = ET.parse(path).getroot()  # noqa: S314 (the official files setup_nodesets.sh installs)
        uris = [UA_URI] + [u.text or "" for u in root.findall("u:NamespaceUris/u:Uri", NS)]
        aliases = {
            a.get("Alias"): (a.text or "").strip() for a in root.findall("u:Aliases/u:Alias", NS)
        }

        def key(text: str) -> Key:
            text = aliases.get(text.strip(), text.strip())
            if text.startswith("ns="):
                ns, _, ident = text.partition(";")
                return uris[int(ns[3:])], ident
            return UA_URI, text

        def qname(text: str) -> Key:
            ns, sep, name = text.partition(":")
            if sep and ns.isdigit():
                return uris[int(ns)], name
            return UA_URI, text

        refs = []
        for elem in root:
            tag = elem.tag.rsplit("}", 1)[-1]
            if not tag.startswith("UA"):
                continue
            node_key = key(elem.get("NodeId", ""))
            datatype = elem.get("DataType")
            self.nodes[node_key] = XmlNode(
                node_key,
                tag[2:],
                qname(elem.get("BrowseName", "")),
                key(datatype) if datatype else None,
            )
            for ref in elem.findall("u:References/u:Reference", NS):
                rtype, target = key(ref.get("ReferenceType", "")), key(ref.text or "")
                if ref.get("IsForward", "true").lower() == "false":
                    refs.append((target, rtype, node_key))
                else:
                    refs.append((node_key, rtype, target))
        return refs

    # -- hierarchy ----------------------------------------------------------------------------
    def is_subtype(self, sub: Key | None, base: Key | None) -> bool:
        """``sub`` equals ``base`` or derives from it (types and data types)."""
        seen = set()
        while sub is not None and sub not in seen:
            if sub == base:
                return True
            seen.add(sub)
            node = self.nodes.get(sub)
            sub = node.supertype if node is not None else None
        return False

    def name(self, key: Key | None) -> str:
        node = self.nodes.get(key) if key is not None else None
        return node.browse_name[1] if node is not None else str(key)

    def _declarations_of(self, owner: Key) -> dict[Key, Declaration]:
        out = {}
        for child in self.nodes[owner].children:
            node = self.nodes.get(child)
            if node is None or node.rule not in (MANDATORY, OPTIONAL):
                continue  # placeholders and nodes without a rule are not instance declarations
            out[node.browse_name] = Declaration(
                child,
                node.node_class,
                node.browse_name,
                node.typedef,
                node.datatype,
                node.rule == MANDATORY,
            )
        return out

    def type_declarations(self, typedef: Key) -> dict[Key, Declaration]:
        """Children declared by ``typedef`` and its supertypes (the subtype's wins)."""
        chain = []
        current: Key | None = typedef
        while current is not None and current in self.nodes:
            chain.append(current)
            current = self.nodes[current].supertype
        out: dict[Key, Declaration] = {}
        for owner in reversed(chain):
            out.update(self._declarations_of(owner))
        return out

    def declarations(self, typedef: Key, declaration: Declaration | None) -> dict[Key, Declaration]:
        """Children an instance must/may have: those of its type definition, overridden by the
        children of the instance declaration it was created from (if any)."""
        out = self.type_declarations(typedef)
        if declaration is not None:
            out.update(self._declarations_of(declaration.key))
        return out
