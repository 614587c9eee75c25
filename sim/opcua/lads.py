"""Information models: the official NodeSets (DI, AMB, IA, Machinery, ISA-95 job control,
Machinery Jobs, LADS) imported from the npm package ``node-opcua-nodesets``
(``sim/opcua/setup_nodesets.sh``), or, when they are not installed, a hand-built subset with
the same namespace URIs, type NodeIds and BrowseNames.

Instances are built node by node with deterministic string NodeIds in the simulator
namespace ``urn:hmpc:sim`` and explicit DisplayNames, then completed to their official type
definitions by :class:`Instantiator` (not asyncua's ``instantiate()``, which omits inherited
mandatory children and assigns its own NodeIds).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from asyncua import Server, ua

from plant_models.errors import ConfigError

__all__ = [
    "AM_URI",
    "DI_URI",
    "HMPC_URI",
    "LADS_URI",
    "Namespaces",
    "NodeBuilder",
    "find_nodesets_dir",
    "load_models",
    "nodeid",
    "status",
]

log = logging.getLogger(__name__)

UA_URI = "http://opcfoundation.org/UA/"
DI_URI = "http://opcfoundation.org/UA/DI/"
AMB_URI = "http://opcfoundation.org/UA/AMB/"
IA_URI = "http://opcfoundation.org/UA/IA/"
MACHINERY_URI = "http://opcfoundation.org/UA/Machinery/"
LADS_URI = "http://opcfoundation.org/UA/LADS/"
AM_URI = "http://opcfoundation.org/UA/AdditiveManufacturing/"
JOBS_URI = "http://opcfoundation.org/UA/Machinery/Jobs/"
HMPC_URI = "urn:hmpc:sim"

#: The printer's NodeSets, in dependency order: DI, AMB, IA and Machinery (identification,
#: MachineryItemState), ISA-95 job control and Machinery Jobs (OPC 40001-3). The
#: AdditiveManufacturing NodeSet (OPC 40540) is not in node-opcua-nodesets nor in any npm or
#: PyPI package we found.
PRINTER_NODESET_FILES = (
    "Opc.Ua.Di.NodeSet2.xml",
    "Opc.Ua.AMB.NodeSet2.xml",
    "Opc.Ua.IA.NodeSet2.xml",
    "Opc.Ua.Machinery.NodeSet2.xml",
    "opc.ua.isa95-jobcontrol.nodeset2.xml",
    "Opc.Ua.Machinery.Jobs.Nodeset2.xml",
)
#: The bioreactor's: the printer's plus LADS, so that both servers (one process) give every
#: imported namespace the same index: asyncua keeps one process-wide registry of the
#: structure classes it builds, keyed by NodeId and name.
NODESET_FILES = (*PRINTER_NODESET_FILES, "Opc.Ua.LADS.NodeSet2.xml")
ISA95_URI = "http://opcfoundation.org/UA/ISA95-JOBCONTROL_V2/"
#: Machinery: the Machines folder, MachineIdentificationType, MachineryItemState_StateMachineType;
#: Machinery Jobs: JobManagementType; ISA-95: ISA95JobOrderReceiverObjectType.
MACHINERY_MACHINES = 1001
MACHINERY_IDENTIFICATION_TYPE = 1012
MACHINERY_ITEM_STATE_TYPE = 1002
JOB_MANAGEMENT_TYPE = 1003
ISA95_JOB_ORDER_RECEIVER_TYPE = 1002

#: Type NodeIds (numeric, in their namespace) of the official NodeSets used by the instances.
DI_DEVICE_SET = 5001
#: AMB's NameNodeIdDataType (LADS ActiveProgram.CurrentProgramTemplate).
NAME_NODEID_DATATYPE = 3003
LADS_TYPES = {
    "LADSDeviceType": 1002,
    "FunctionalUnitType": 1003,
    "ProgramManagerType": 1006,
    "AnalogControlFunctionType": 1009,
    "AnalogControlFunctionWithTotalizerType": 1014,
    "AnalogScalarSensorFunctionType": 1016,
    "FunctionalUnitSetType": 1023,
    "FunctionSetType": 1026,
    "FunctionalUnitStateMachineType": 1043,
    "LADSDeviceStateMachineType": 1039,
    "ControlFunctionStateMachineType": 1044,
    "ProgramTemplateSetType": 1019,
    "ResultSetType": 1020,
    "ActiveProgramType": 1040,
}

_DESIGN_TOOL_ONLY = re.compile(
    r'<UA(Object|Variable)\b[^>]*DesignToolOnly="true"[^>]*>.*?</UA\1>', re.DOTALL
)


def nodeid(ident: int | str, ns: int = 0) -> ua.NodeId:
    """A NodeId from plain Python values (asyncua's annotations want its NewTypes)."""
    if isinstance(ident, str):
        return ua.NodeId(ua.String(ident), ua.Int16(ns))
    return ua.NodeId(ua.Int32(ident), ua.Int16(ns))


def status(code: int) -> ua.StatusCode:
    return ua.StatusCode(ua.UInt32(code))


def find_nodesets_dir(explicit: Path | None = None) -> Path | None:
    """The ``nodesets/`` folder of node-opcua-nodesets: ``explicit``, else
    ``$HMPC_NODESETS_DIR``, else ``<repo>/build/opcua/node_modules/...`` if present."""
    candidates = []
    if explicit is not None:
        candidates.append(explicit)
    elif os.environ.get("HMPC_NODESETS_DIR"):
        candidates.append(Path(os.environ["HMPC_NODESETS_DIR"]))
    else:
        root = Path(__file__).resolve().parents[2]
        candidates.append(root / "build/opcua/node_modules/node-opcua-nodesets/nodesets")
    for path in candidates:
        if all((path / f).is_file() for f in NODESET_FILES):
            return path
    if explicit is not None:
        raise ConfigError(
            f"{explicit}: the NodeSets {', '.join(NODESET_FILES)} are not all there; "
            "run sim/opcua/setup_nodesets.sh"
        )
    return None


def _patched(text: str) -> str:
    """The importer fixes of docs/opcua.md: LADS spells the encoding "Default JSON" (asyncua
    expects "Default Json"); DI 1.05 has DesignToolOnly nodes without a parent, which the
    importer refuses."""
    text = _DESIGN_TOOL_ONLY.sub("", text)
    # Machinery Jobs: a structure field of an OptionSet type derived from Byte, which
    # asyncua cannot build a class for; Byte is the same encoding
    text = text.replace(
        '<Field Name="OutputInfo" DataType="OutputInfoType">',
        '<Field Name="OutputInfo" DataType="Byte">',
    )
    return text.replace("Default JSON", "Default Json")


@dataclasses.dataclass(frozen=True)
class Namespaces:
    """Namespace indexes of this server (never cache them in a client: resolve by URI)."""

    di: int
    lads: int
    hmpc: int
    official: bool
    amb: int = 0

    def lads_type(self, name: str) -> ua.NodeId:
        return nodeid(LADS_TYPES[name], self.lads)


async def load_models(server: Server, nodesets: Path | None, *, hand_built: bool) -> Namespaces:
    """Import the official NodeSets, or build the subset by hand (``hand_built`` or when no
    NodeSets are found)."""
    if not hand_built and nodesets is not None:
        await import_nodesets(server, nodesets, NODESET_FILES)
        official = True
        log.info("imported the official NodeSets from %s", nodesets)
    else:
        if not hand_built:
            log.warning(
                "official NodeSets not installed (sim/opcua/setup_nodesets.sh): using the "
                "hand-built LADS subset with the official URIs, type NodeIds and BrowseNames"
            )
        await _hand_built_types(server)
        official = False
    di = await server.get_namespace_index(DI_URI)
    lads = await server.get_namespace_index(LADS_URI)
    amb = await server.get_namespace_index(AMB_URI)
    hmpc = await server.register_namespace(HMPC_URI)
    return Namespaces(di=di, lads=lads, hmpc=hmpc, official=official, amb=amb)


async def import_nodesets(server: Server, nodesets: Path, files: Sequence[str]) -> None:
    """Import ``files`` from ``nodesets`` (with the fixes of :func:`_patched`). The importer
    logs every reference it repairs (hundreds of lines for DI/LADS): keep its errors only."""
    importer_log = logging.getLogger("asyncua.common.xmlimporter")
    struct_log = logging.getLogger("asyncua.common.structures104")
    levels = importer_log.level, struct_log.level
    importer_log.setLevel(logging.ERROR)
    struct_log.setLevel(logging.ERROR)
    try:
        for name in files:
            path = nodesets / name
            if not path.is_file():
                raise ConfigError(f"{path}: missing; run sim/opcua/setup_nodesets.sh")
            await server.import_xml(xmlstring=_patched(path.read_text(encoding="utf-8")))
    finally:
        importer_log.setLevel(levels[0])
        struct_log.setLevel(levels[1])


async def _hand_built_types(server: Server) -> None:
    di = await server.register_namespace(DI_URI)
    for uri in (AMB_URI, IA_URI, MACHINERY_URI):
        await server.register_namespace(uri)
    lads = await server.register_namespace(LADS_URI)
    base = server.get_node(nodeid(ua.ObjectIds.BaseObjectType))
    await base.add_object_type(nodeid(1001, di), ua.QualifiedName("TopologyElementType", di))
    for name, ident in LADS_TYPES.items():
        await base.add_object_type(nodeid(ident, lads), ua.QualifiedName(name, lads))
    objects = server.nodes.objects
    await objects.add_object(nodeid(DI_DEVICE_SET, di), ua.QualifiedName("DeviceSet", di))


def _unece_id(code: str) -> int:
    """UNECE Rec. 20 common code -> OPC UA UnitId (Part 8)."""
    ident = 0
    for ch in code:
        ident = (ident << 8) | ord(ch)
    return ident


#: Canonical unit -> (UNECE code or "" for none, description).
UNITS: dict[str, tuple[str, str]] = {
    "mM": ("M33", "millimole per litre"),
    "h": ("HUR", "hour"),
    "L": ("LTR", "litre"),
    "mL": ("MLT", "millilitre"),
    "1": ("C62", "one (dimensionless)"),
    "1/d": ("", "per day (vessel volumes per day)"),
    "L/h": ("", "litre per hour"),
    "mL/h": ("", "millilitre per hour"),
    "kIU/h": ("", "thousand international units per hour"),
    "kIU": ("", "thousand international units"),
    "IU/mL": ("", "international units per millilitre"),
    "1e6 cells/mL": ("", "million cells per millilitre"),
    "1e9 cells/L": ("", "billion cells per litre"),
    "1e9 cells": ("", "billion cells"),
    "degC": ("CEL", "degree Celsius"),
    "kPa": ("KPA", "kilopascal"),
    "mJ/cm2": ("", "millijoule per square centimetre"),
    "%": ("P1", "percent"),
}


def eu_information(unit: str) -> ua.EUInformation:
    code, description = UNITS.get(unit, ("", unit))
    return ua.EUInformation(
        NamespaceUri="http://www.opcfoundation.org/UA/units/un/cefact",
        UnitId=_unece_id(code) if code else -1,
        DisplayName=ua.LocalizedText(unit if not code or unit != "1" else ""),
        Description=ua.LocalizedText(description),
    )


class NodeBuilder:
    """Adds nodes with explicit type definitions, DisplayNames and string NodeIds."""

    def __init__(self, server: Server, ns: int) -> None:
        self.server = server
        self.ns = ns

    def nid(self, path: str) -> ua.NodeId:
        return nodeid(path, self.ns)

    async def _add(self, item: ua.AddNodesItem) -> ua.NodeId:
        result = (await self.server.iserver.isession.add_nodes([item]))[0]
        if not result.StatusCode.is_good():
            raise ConfigError(
                f"adding node {item.RequestedNewNodeId} failed: {result.StatusCode.name}"
            )
        return item.RequestedNewNodeId

    async def object(
        self,
        parent: ua.NodeId,
        path: str,
        browse_name: ua.QualifiedName,
        typedef: ua.NodeId,
        *,
        reference: int = ua.ObjectIds.HasComponent,
    ) -> ua.NodeId:
        attrs = ua.ObjectAttributes()
        attrs.DisplayName = ua.LocalizedText(browse_name.Name)
        attrs.EventNotifier = 0
        item = ua.AddNodesItem(
            RequestedNewNodeId=self.nid(path),
            BrowseName=browse_name,
            NodeClass=ua.NodeClass.Object,
            ParentNodeId=parent,
            ReferenceTypeId=nodeid(reference),
            TypeDefinition=typedef,
            NodeAttributes=attrs,
        )
        return await self._add(item)

    async def variable(
        self,
        parent: ua.NodeId,
        path: str,
        browse_name: ua.QualifiedName,
        value: Any,
        vtype: ua.VariantType,
        *,
        typedef: int = ua.ObjectIds.BaseDataVariableType,
        reference: int = ua.ObjectIds.HasComponent,
        writable: bool = False,
        array: bool = False,
        datatype: ua.NodeId | None = None,
    ) -> ua.NodeId:
        attrs = ua.VariableAttributes()
        attrs.DisplayName = ua.LocalizedText(browse_name.Name)
        attrs.Value = ua.Variant(value, vtype, is_array=array)
        attrs.DataType = datatype if datatype is not None else _datatype(vtype)
        attrs.ValueRank = ua.ValueRank.OneDimension if array else ua.ValueRank.Scalar
        if array:
            attrs.ArrayDimensions = [0]
        level = ua.AccessLevel.CurrentRead.mask
        if writable:
            level |= ua.AccessLevel.CurrentWrite.mask
        attrs.AccessLevel = level
        attrs.UserAccessLevel = level
        item = ua.AddNodesItem(
            RequestedNewNodeId=self.nid(path),
            BrowseName=browse_name,
            NodeClass=ua.NodeClass.Variable,
            ParentNodeId=parent,
            ReferenceTypeId=nodeid(reference),
            TypeDefinition=nodeid(typedef),
            NodeAttributes=attrs,
        )
        return await self._add(item)

    async def analog(
        self,
        parent: ua.NodeId,
        path: str,
        browse_name: ua.QualifiedName,
        value: float,
        unit: str,
        low: float,
        high: float,
    ) -> ua.NodeId:
        """An AnalogUnitRangeType (a subtype of AnalogItemType) Double with its
        EngineeringUnits and EURange properties."""
        node = await self.variable(
            parent,
            path,
            browse_name,
            value,
            ua.VariantType.Double,
            typedef=ua.ObjectIds.AnalogUnitRangeType,
        )
        await self.property(
            node, f"{path}.EngineeringUnits", "EngineeringUnits", eu_information(unit)
        )
        await self.property(node, f"{path}.EURange", "EURange", ua.Range(Low=low, High=high))
        return node

    async def property(self, parent: ua.NodeId, path: str, name: str, value: Any) -> ua.NodeId:
        vtype = _property_vtype(value)
        return await self.variable(
            parent,
            path,
            ua.QualifiedName(name, 0),
            value,
            vtype,
            typedef=ua.ObjectIds.PropertyType,
            reference=ua.ObjectIds.HasProperty,
            datatype=_property_datatype(value),
        )

    async def method(
        self,
        parent: ua.NodeId,
        path: str,
        browse_name: ua.QualifiedName,
        func: Any,
        inputs: Sequence[ua.Argument],
        outputs: Sequence[ua.Argument],
    ) -> ua.NodeId:
        node = await self.server.get_node(parent).add_method(
            self.nid(path), browse_name, _checked(func, len(inputs)), list(inputs), list(outputs)
        )
        return node.nodeid


def _checked(func: Any, count: int) -> Any:
    """The handler behind a count check: a call with more input arguments than the method
    declares is BadTooManyArguments, with fewer BadArgumentsMissing (Part 4, Call)."""

    async def handler(parent: ua.NodeId, *args: ua.Variant) -> Any:
        if len(args) > count:
            return status(ua.StatusCodes.BadTooManyArguments)
        if len(args) < count:
            return status(ua.StatusCodes.BadArgumentsMissing)
        return await func(parent, *args)

    return handler


def argument(
    name: str, vtype: ua.VariantType, description: str, *, array: bool = False
) -> ua.Argument:
    arg = ua.Argument()
    arg.Name = name
    arg.DataType = _datatype(vtype)
    arg.ValueRank = ua.ValueRank.OneDimension if array else ua.ValueRank.Scalar
    arg.ArrayDimensions = [0] if array else []
    arg.Description = ua.LocalizedText(description)
    return arg


def _datatype(vtype: ua.VariantType) -> ua.NodeId:
    if vtype is ua.VariantType.ExtensionObject:
        return nodeid(ua.ObjectIds.Structure)
    return nodeid(vtype.value)


def _property_datatype(value: Any) -> ua.NodeId | None:
    if isinstance(value, ua.EUInformation):
        return nodeid(ua.ObjectIds.EUInformation)
    if isinstance(value, ua.Range):
        return nodeid(ua.ObjectIds.Range)
    return None


def _property_vtype(value: Any) -> ua.VariantType:
    if isinstance(value, ua.EUInformation | ua.Range):
        return ua.VariantType.ExtensionObject
    if isinstance(value, bool):
        return ua.VariantType.Boolean
    if isinstance(value, float):
        return ua.VariantType.Double
    if isinstance(value, int):
        return ua.VariantType.UInt32
    if isinstance(value, ua.LocalizedText):
        return ua.VariantType.LocalizedText
    return ua.VariantType.String


# -- instantiation from the official type definitions ------------------------------------------
_MANDATORY = 78
_OPTIONAL = 80
#: HasProperty, HasComponent, HasOrderedComponent, HasAddIn: the references that declare
#: (and then instantiate) the children of a type.
_CHILD_REFERENCES = frozenset(
    (ua.ObjectIds.HasProperty, ua.ObjectIds.HasComponent, ua.ObjectIds.HasOrderedComponent, 17604)
)
_HIERARCHICAL = _CHILD_REFERENCES | {ua.ObjectIds.Organizes}


def _default_value(datatype: ua.NodeId, value_rank: int) -> ua.Variant:
    """A typed empty value for a mandatory variable the simulator has nothing for."""
    if value_rank >= 0 or value_rank == ua.ValueRank.OneOrMoreDimensions:
        try:
            vtype = ua.datatype_to_varianttype(datatype)
        except (KeyError, ValueError, ua.UaError):  # a structure of a companion spec
            vtype = ua.VariantType.ExtensionObject
        if not isinstance(vtype, ua.VariantType) or vtype is ua.VariantType.Null:
            return ua.Variant()
        return ua.Variant([], vtype, is_array=True)
    if datatype.NamespaceIndex != 0 or not isinstance(datatype.Identifier, int):
        return ua.Variant()
    defaults: dict[int, ua.Variant] = {
        ua.ObjectIds.String: ua.Variant("", ua.VariantType.String),
        ua.ObjectIds.LocalizedText: ua.Variant(ua.LocalizedText(""), ua.VariantType.LocalizedText),
        ua.ObjectIds.Boolean: ua.Variant(False, ua.VariantType.Boolean),
        ua.ObjectIds.NodeId: ua.Variant(ua.NodeId(), ua.VariantType.NodeId),
        ua.ObjectIds.Duration: ua.Variant(0.0, ua.VariantType.Double),
        ua.ObjectIds.Double: ua.Variant(0.0, ua.VariantType.Double),
        ua.ObjectIds.Int32: ua.Variant(0, ua.VariantType.Int32),
        ua.ObjectIds.UInt16: ua.Variant(0, ua.VariantType.UInt16),
        ua.ObjectIds.UInt32: ua.Variant(0, ua.VariantType.UInt32),
        ua.ObjectIds.Range: ua.Variant(ua.Range(), ua.VariantType.ExtensionObject),
        ua.ObjectIds.EUInformation: ua.Variant(eu_information("1"), ua.VariantType.ExtensionObject),
    }
    return defaults.get(datatype.Identifier, ua.Variant())


class Instantiator:
    """Completes instances to their type definitions, from the types in the server's own
    address space (the imported NodeSets): every Mandatory child of the type, its supertypes
    and the instance declaration (recursively), with the declared BrowseName, reference,
    type definition, DataType, ValueRank and AccessLevel. Children that exist already (built
    with live values by the server) are kept and completed in turn. New children get the
    string NodeId ``<parent path>.<BrowseName>``; ``values`` gives values by that NodeId
    (default: the declared value, else a typed empty value). Methods created here answer
    ``BadNotImplemented`` unless ``methods`` has a handler for their NodeId."""

    def __init__(self, builder: NodeBuilder) -> None:
        self.b = builder
        self.aspace = builder.server.iserver.aspace
        self.created = 0

    def _refs(self, nid: ua.NodeId) -> list[ua.ReferenceDescription]:
        data = self.aspace.get(nid)
        return list(data.references) if data is not None else []

    def _attr(self, nid: ua.NodeId, attr: ua.AttributeIds) -> Any:
        dv = self.aspace.read_attribute_value(nid, attr)
        return dv.Value.Value if dv.Value is not None else None

    def _supertype(self, nid: ua.NodeId) -> ua.NodeId | None:
        for ref in self._refs(nid):
            if not ref.IsForward and ref.ReferenceTypeId == nodeid(ua.ObjectIds.HasSubtype):
                return ref.NodeId
        return None

    def states(self, typedef: ua.NodeId) -> dict[str, ua.NodeId]:
        """The states (StateType objects) a state machine type and its supertypes declare,
        by name: the values of ``CurrentState.Id`` and ``AvailableStates``."""
        out: dict[str, ua.NodeId] = {}
        current: ua.NodeId | None = typedef
        state_types = {nodeid(ua.ObjectIds.StateType), nodeid(ua.ObjectIds.InitialStateType)}
        while current is not None and current in self.aspace:
            for ref in self._refs(current):
                if (
                    ref.IsForward
                    and ref.ReferenceTypeId == nodeid(ua.ObjectIds.HasComponent)
                    and ref.TypeDefinition in state_types
                ):
                    out.setdefault(ref.BrowseName.Name, ref.NodeId)
            current = self._supertype(current)
        return out

    def state_number(self, state: ua.NodeId) -> int:
        """The StateNumber property of a state (0 when it has none)."""
        for ref in self._refs(state):
            if ref.IsForward and ref.BrowseName.Name == "StateNumber":
                value = self._attr(ref.NodeId, ua.AttributeIds.Value)
                return int(value) if value is not None else 0
        return 0

    def method_arguments(
        self, typedef: ua.NodeId, browse_name: str
    ) -> tuple[list[ua.Argument], list[ua.Argument]]:
        """The InputArguments and OutputArguments a type declares for its method
        ``browse_name`` (``ns:name``); none when the type does not declare it."""
        found = self.declarations(typedef, None).get(browse_name)
        if found is None:
            return [], []
        return self._arguments(found[0])

    def _arguments(self, method: ua.NodeId) -> tuple[list[ua.Argument], list[ua.Argument]]:
        decls = self.declarations(None, method)
        out: list[list[ua.Argument]] = []
        for name in ("0:InputArguments", "0:OutputArguments"):
            value = self._attr(decls[name][0], ua.AttributeIds.Value) if name in decls else None
            out.append(list(value or []))
        return out[0], out[1]

    def _declared(self, owner: ua.NodeId) -> dict[str, tuple[ua.NodeId, int, bool]]:
        """BrowseName (``ns:name``) -> (declaration, reference type id, mandatory)."""
        out = {}
        for ref in self._refs(owner):
            rtype = ref.ReferenceTypeId
            if (
                not ref.IsForward
                or rtype.NamespaceIndex != 0
                or rtype.Identifier not in _CHILD_REFERENCES
            ):
                continue
            rule = None
            for r in self._refs(ref.NodeId):
                if r.IsForward and r.ReferenceTypeId == nodeid(ua.ObjectIds.HasModellingRule):
                    rule = r.NodeId.Identifier if r.NodeId.NamespaceIndex == 0 else None
            if rule in (_MANDATORY, _OPTIONAL):
                key = ref.BrowseName.to_string()
                out[key] = (ref.NodeId, int(rtype.Identifier), rule == _MANDATORY)
        return out

    def declarations(
        self, typedef: ua.NodeId | None, declaration: ua.NodeId | None
    ) -> dict[str, tuple[ua.NodeId, int, bool]]:
        chain: list[ua.NodeId] = []
        current = typedef
        while current is not None and current in self.aspace and len(chain) < 32:
            chain.append(current)
            current = self._supertype(current)
        out: dict[str, tuple[ua.NodeId, int, bool]] = {}
        for owner in reversed(chain):
            out.update(self._declared(owner))
        if declaration is not None:
            out.update(self._declared(declaration))
        return out

    def _typedef(self, nid: ua.NodeId) -> ua.NodeId | None:
        for ref in self._refs(nid):
            if ref.IsForward and ref.ReferenceTypeId == nodeid(ua.ObjectIds.HasTypeDefinition):
                return ref.NodeId
        return None

    async def complete(
        self,
        node: ua.NodeId,
        *,
        declaration: ua.NodeId | None = None,
        values: dict[str, Any] | None = None,
        methods: dict[str, Any] | None = None,
    ) -> None:
        """Add the missing Mandatory children of ``node`` (a string NodeId of ours)."""
        self._visited: set[ua.NodeId] = set()
        await self._complete(node, str(node.Identifier), declaration, values or {}, methods or {})

    async def _complete(
        self,
        node: ua.NodeId,
        path: str,
        declaration: ua.NodeId | None,
        values: dict[str, Any],
        methods: dict[str, Any],
    ) -> None:
        if node in self._visited:
            return
        self._visited.add(node)
        decls = self.declarations(self._typedef(node), declaration)
        existing = {}
        for ref in self._refs(node):
            rtype = ref.ReferenceTypeId
            if ref.IsForward and rtype.NamespaceIndex == 0 and rtype.Identifier in _HIERARCHICAL:
                existing[ref.BrowseName.to_string()] = ref.NodeId
        for key, (decl, rtype, mandatory) in decls.items():
            child = existing.get(key)
            if child is None and not mandatory:
                continue
            if child is None:
                child = await self._create(node, path, decl, rtype, values, methods)
            elif child.NamespaceIndex != self.b.ns or not isinstance(child.Identifier, str):
                continue  # not ours (e.g. a shared node)
            await self._complete(child, str(child.Identifier), decl, values, methods)
        for key, child in existing.items():  # instances below (e.g. in a FunctionSet)
            if key not in decls and child.NamespaceIndex == self.b.ns:
                await self._complete(child, str(child.Identifier), None, values, methods)

    async def _create(
        self,
        parent: ua.NodeId,
        path: str,
        decl: ua.NodeId,
        rtype: int,
        values: dict[str, Any],
        methods: dict[str, Any],
    ) -> ua.NodeId:
        bname: ua.QualifiedName = self._attr(decl, ua.AttributeIds.BrowseName)
        node_class: ua.NodeClass = ua.NodeClass(self._attr(decl, ua.AttributeIds.NodeClass))
        child_path = f"{path}.{bname.Name}"
        nid = self.b.nid(child_path)
        typedef = self._typedef(decl)
        self.created += 1
        if node_class is ua.NodeClass.Method:
            handler = methods.get(child_path, _not_implemented)
            inputs, outputs = self._arguments(decl)
            return await self.b.method(parent, child_path, bname, handler, inputs, outputs)
        if node_class is ua.NodeClass.Object:
            return await self.b.object(
                parent,
                child_path,
                bname,
                typedef if typedef is not None else nodeid(ua.ObjectIds.BaseObjectType),
                reference=rtype,
            )
        datatype: ua.NodeId = self._attr(decl, ua.AttributeIds.DataType)
        rank = int(self._attr(decl, ua.AttributeIds.ValueRank))
        if child_path in values:
            value = values[child_path]
            variant = value if isinstance(value, ua.Variant) else ua.Variant(value)
        else:
            dv = self.aspace.read_attribute_value(decl, ua.AttributeIds.Value)
            declared = dv.Value if dv.Value is not None else None
            if declared is not None and declared.Value is not None:
                variant = declared
            else:
                variant = _default_value(datatype, rank)
        attrs = ua.VariableAttributes()
        attrs.DisplayName = ua.LocalizedText(bname.Name)
        attrs.Value = variant
        attrs.DataType = datatype
        attrs.ValueRank = rank
        dims = self._attr(decl, ua.AttributeIds.ArrayDimensions)
        if dims:
            attrs.ArrayDimensions = dims
        attrs.AccessLevel = ua.AccessLevel.CurrentRead.mask
        attrs.UserAccessLevel = ua.AccessLevel.CurrentRead.mask
        item = ua.AddNodesItem(
            RequestedNewNodeId=nid,
            BrowseName=bname,
            NodeClass=ua.NodeClass.Variable,
            ParentNodeId=parent,
            ReferenceTypeId=nodeid(rtype),
            TypeDefinition=typedef
            if typedef is not None
            else nodeid(ua.ObjectIds.BaseDataVariableType),
            NodeAttributes=attrs,
        )
        return await self.b._add(item)


async def _not_implemented(parent: ua.NodeId, *args: ua.Variant) -> ua.StatusCode:
    """A Mandatory method of an official type that the simulator does not model."""
    return status(ua.StatusCodes.BadNotImplemented)
