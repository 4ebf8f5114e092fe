"""Nothing is written or deleted through a symbolic link inside a store.

A link planted there (`tiles.zarr/<case> -> ~/elsewhere`) must not let radpath change files outside
the store. `refuse_links` checks a path before a write; `LinkSafeLocalStore`, the zarr LocalStore of
a local store, checks every key it writes or deletes: zarr writes each chunk and metadata file
under the store's folder by path, and a link at any level (`tiles.zarr`, `tiles.zarr/<case>`, a
chunk folder) would otherwise redirect those writes, and a group rewrite's delete, outside the
store. Reads follow links.
"""

from __future__ import annotations

import os

from zarr.storage import LocalStore

from radpath_fs.errors import StoreError
from radpath_fs.layout import check_inside


def refuse_links(base: str | os.PathLike, rel: str) -> None:
    """Raise StoreError when `base/rel`, or a folder on the way to it below `base`, is a symbolic link.

    `base` itself may be a link (a store folder kept on another disk).
    """
    parts = [p for p in check_inside(rel).split("/") if p]
    current = os.fspath(base)
    for part in parts:
        current = os.path.join(current, part)
        if os.path.islink(current):
            raise StoreError(
                f"{current}: is a symbolic link (to {os.readlink(current)}); radpath writes nothing through a "
                "link inside a store, so that no write can land outside it. Put the folder or file itself there."
            )
        if not os.path.exists(current):
            return  # nothing below exists yet: no link can be on the way


class LinkSafeLocalStore(LocalStore):
    def _check(self, key: str) -> None:
        # The zarr folder itself (`tiles.zarr`) is below the radpath store root: check it too.
        refuse_links(self.root.parent, f"{self.root.name}/{key}")

    async def set(self, key, value) -> None:
        self._check(key)
        return await super().set(key, value)

    async def set_if_not_exists(self, key, value) -> None:
        self._check(key)
        return await super().set_if_not_exists(key, value)

    async def delete(self, key) -> None:
        self._check(key)
        return await super().delete(key)

    async def delete_dir(self, prefix) -> None:
        self._check(prefix)
        return await super().delete_dir(prefix)

    def set_sync(self, key, value) -> None:
        self._check(key)
        return super().set_sync(key, value)

    def delete_sync(self, key) -> None:
        self._check(key)
        return super().delete_sync(key)
