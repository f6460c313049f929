"""The Netmera sandbox's records: a user (:class:`User`), a device (:class:`Device`), a segment, an event and a
notification. :class:`~.netmera_state.NetmeraState` holds them and re-exports them.

User and device records are small, so that 10M users fit in a few GB (measured by ``bench/bench_sandbox.py``);
absent fields cost nothing:

* a :class:`User` has three slots: its devices (``None``, the one :class:`Device` itself, or a tuple — no list
  per user), its profile packed as ``(shape, *values)`` where ``shape`` is the tuple of attribute names shared by
  every profile with the same names, and an :class:`_Extra` part for categories, e-mail, MSISDN and opt-ins,
  created only when one of those is set;
* a :class:`Device` keeps platform, model and ``pushPermitted`` as one shared, interned tuple.

The record attributes read as plain attributes (``user.email``, ``user.devices``, ``device.platform`` …);
``user.profile`` is a read-only view built on each read: change a profile by assigning a mapping to it or
through the ``User`` methods the handlers use.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Generic, TypeVar, overload

__all__ = ["PLATFORMS", "Device", "Event", "Notification", "Segment", "User"]

PLATFORMS = ("IOS", "ANDROID")

T = TypeVar("T")

_MAX_SHARED = 65_536
"""Bound of each cache of shared tuples below: past it, new shapes and kinds are simply not shared (still correct)."""

DeviceKind = tuple[str, str | None, bool]
_KINDS: dict[DeviceKind, DeviceKind] = {}  # (platform, model, pushPermitted) → the one shared tuple
_SHAPES: dict[tuple[str, ...], tuple[str, ...]] = {}  # profile attribute names → the one shared tuple
_EMPTY_PROFILE: tuple[Any, ...] = ((),)  # a profile that was set and is now empty (dumped as {}, unlike None)


def _intern(value: Any) -> Any:
    return sys.intern(value) if type(value) is str else value


def _device_kind(platform: str, device_model: str | None, push_permitted: bool) -> DeviceKind:
    key = (platform, device_model, bool(push_permitted))
    kind = _KINDS.get(key)
    if kind is None:
        kind = (_intern(platform), _intern(device_model), key[2])
        if len(_KINDS) < _MAX_SHARED:
            _KINDS[kind] = kind
    return kind


def _pack(profile: Mapping[str, Any]) -> tuple[Any, ...]:
    """``(shape, *values)``: 64 bytes for 2 attributes, where a 2-key dict takes 184 (``sys.getsizeof``)."""
    if not profile:
        return _EMPTY_PROFILE
    names = tuple(profile)
    shape = _SHAPES.get(names)
    if shape is None:
        shape = tuple(_intern(name) for name in names)
        if len(_SHAPES) < _MAX_SHARED:
            _SHAPES[shape] = shape
    return (shape, *profile.values())


def _unpack(packed: tuple[Any, ...] | None) -> dict[str, Any]:
    return {} if packed is None else dict(zip(packed[0], packed[1:], strict=True))


class Device:
    """One device of a user. Platform, model and ``push_permitted`` live in one shared tuple (16 bytes less per
    device than three slots); they read and write as attributes."""

    __slots__ = ("_kind", "ext_id", "token")

    def __init__(
        self,
        ext_id: str,
        platform: str,
        token: str,
        device_model: str | None = None,
        push_permitted: bool = True,
    ) -> None:
        self.ext_id = ext_id
        self.token = token
        self._kind: DeviceKind = _device_kind(platform, device_model, push_permitted)

    @property
    def platform(self) -> str:
        return self._kind[0]

    @platform.setter
    def platform(self, value: str) -> None:
        self._kind = _device_kind(value, self._kind[1], self._kind[2])

    @property
    def device_model(self) -> str | None:
        return self._kind[1]

    @device_model.setter
    def device_model(self, value: str | None) -> None:
        self._kind = _device_kind(self._kind[0], value, self._kind[2])

    @property
    def push_permitted(self) -> bool:
        return self._kind[2]

    @push_permitted.setter
    def push_permitted(self, value: bool) -> None:
        self._kind = _device_kind(self._kind[0], self._kind[1], value)

    def to_api(self) -> dict[str, Any]:
        """The documented item shape of getDevices / getDeviceTokens."""
        platform, model, permitted = self._kind
        return {"platform": platform, "token": self.token, "deviceModel": model, "pushPermitted": permitted}


class _Extra:
    """The fields of a :class:`User` that most users never get; created on the first one set."""

    __slots__ = ("categories", "email", "email_opt_in", "msisdn", "sms_opt_in")

    def __init__(self) -> None:
        self.categories: dict[str, bool] | None = None  # category → enabled
        self.email: str | None = None
        self.email_opt_in: bool | None = None  # None: never set
        self.msisdn: str | None = None
        self.sms_opt_in: bool | None = None


class _InExtra(Generic[T]):
    """A :class:`User` attribute stored in its :class:`_Extra` part: reads None while there is none, and writing
    None does not create one."""

    __slots__ = ("_name",)

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    @overload
    def __get__(self, record: None, owner: type | None = None) -> _InExtra[T]: ...
    @overload
    def __get__(self, record: User, owner: type | None = None) -> T | None: ...
    def __get__(self, record: User | None, owner: type | None = None) -> T | _InExtra[T] | None:
        if record is None:
            return self  # read on the class
        extra = record._extra
        return None if extra is None else getattr(extra, self._name)

    def __set__(self, record: User, value: T | None) -> None:
        extra = record._extra
        if extra is None:
            if value is None:
                return
            extra = record._extra = _Extra()
        setattr(extra, self._name, value)


class User:
    """Everything but tags about one user, in three slots (see the module docstring); absent fields cost nothing.

    ``profile`` is a read-only view built on each read (None until a profile is set): assign a mapping to replace
    it, or use :meth:`update_profile` and the other profile methods. ``devices`` is a new list on each read.
    """

    __slots__ = ("_devices", "_extra", "_profile")

    categories: _InExtra[dict[str, bool]] = _InExtra()
    """category → enabled (the dict itself: changes to it are kept)."""
    email: _InExtra[str] = _InExtra()
    email_opt_in: _InExtra[bool] = _InExtra()
    """None: never set."""
    msisdn: _InExtra[str] = _InExtra()
    sms_opt_in: _InExtra[bool] = _InExtra()

    def __init__(self) -> None:
        self._devices: Device | tuple[Device, ...] | None = None  # one device is stored as itself
        self._profile: tuple[Any, ...] | None = None  # (shape, *values); None: never set
        self._extra: _Extra | None = None

    # -- devices

    def device_tuple(self) -> tuple[Device, ...]:
        """The user's devices in registration order, without copying."""
        devices = self._devices
        if devices is None:
            return ()
        return (devices,) if isinstance(devices, Device) else devices

    @property
    def devices(self) -> list[Device]:
        return list(self.device_tuple())

    @devices.setter
    def devices(self, devices: Iterable[Device] | None) -> None:
        kept = tuple(devices or ())
        self._devices = None if not kept else kept[0] if len(kept) == 1 else kept

    def add_device(self, device: Device) -> None:
        current = self._devices
        if current is None:
            self._devices = device
        elif isinstance(current, Device):
            self._devices = (current, device)
        else:
            self._devices = (*current, device)

    # -- profile

    @property
    def profile(self) -> Mapping[str, Any] | None:
        packed = self._profile
        return None if packed is None else MappingProxyType(_unpack(packed))

    @profile.setter
    def profile(self, profile: Mapping[str, Any] | None) -> None:
        self._profile = None if profile is None else _pack(profile)

    def profile_dict(self) -> dict[str, Any] | None:
        """The profile as a new dict (None until set)."""
        packed = self._profile
        return None if packed is None else _unpack(packed)

    def update_profile(self, changes: Mapping[str, Any]) -> None:
        """setProfileAttributes: the given attributes overwritten, the others kept (sets an empty profile too)."""
        profile = _unpack(self._profile)
        profile.update(changes)
        self._profile = _pack(profile)

    def unset_profile(self, names: Iterable[str]) -> None:
        """unsetProfileAttributes: remove the attributes (a user without a profile keeps none)."""
        if self._profile is None or self._profile is _EMPTY_PROFILE:
            return
        profile = _unpack(self._profile)
        for name in names:
            profile.pop(name, None)
        self._profile = _pack(profile)

    def change_profile_arrays(self, changes: Mapping[str, list[Any]], *, push: bool) -> None:
        """push/pullProfileAttributes: append the values to array attributes, or remove every occurrence.

        The caller has checked that every attribute named is an array or absent."""
        profile = _unpack(self._profile)
        for name, values in changes.items():
            current = profile.get(name)
            if push:
                profile[name] = [*(current or ()), *values]
            elif current is not None:
                profile[name] = [v for v in current if v not in values]
        self._profile = _pack(profile)

    def delete_profile_attributes(self, names: set[str]) -> int:
        """deleteProfileAttributes for this user; returns how many attributes holding a value were removed."""
        packed = self._profile
        if packed is None or names.isdisjoint(packed[0]):
            return 0  # the common case, decided on the shared shape without building a dict
        profile = _unpack(packed)
        removed = sum(1 for name in names if profile.pop(name, None) is not None)
        self._profile = _pack(profile)
        return removed

    def delete_profile_value(self, pairs: list[tuple[str, Any]]) -> int:
        """deleteProfileAttributeValue for this user: the value leaves array attributes; a scalar attribute equal
        to it is removed [I]. Returns how many attributes changed."""
        packed = self._profile
        if packed is None or not any(key in packed[0] for key, _ in pairs):
            return 0
        profile = _unpack(packed)
        touched = 0
        for key, value in pairs:
            current = profile.get(key)
            if type(current) is list and value in current:
                profile[key] = [v for v in current if v != value]
                touched += 1
            elif current == value:
                del profile[key]
                touched += 1
        if touched:
            self._profile = _pack(profile)
        return touched


@dataclass(slots=True)
class Segment:
    """A segment defined "in the panel" (seeded): its members in a stable order for paging."""

    id: int
    name: str
    type: str = "PRODUCT_SEGMENT"
    members: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Event:
    """One fired event."""

    ext_id: str
    name: str
    attributes: dict[str, Any]
    received_at: float


@dataclass(slots=True)
class Notification:
    """A notification created by sendBulkNotification or sent by sendNotification."""

    key: int
    kind: str  # "bulk" or "transactional"
    message: dict[str, Any]
    target: Any
    created_at: float
    status: str = "FINISHED"
    approved: bool = False
    sent: dict[str, int] = field(default_factory=dict)  # platform → devices reached
