//! What every list response shares: a page ends before [`MAX_PAGE_BYTES`],
//! whatever page size was asked for, so that it stays well inside the 4 MiB
//! that gRPC clients accept by default.

/// The most a page of items carries.
pub const MAX_PAGE_BYTES: usize = 1 << 20;

/// The leading `items` whose `size`s add up to at most [`MAX_PAGE_BYTES`],
/// and always the first one, so that paging moves on.
pub fn within_bytes<T>(
    items: impl IntoIterator<Item = T>,
    size: impl Fn(&T) -> usize,
) -> impl Iterator<Item = T> {
    let mut bytes = 0;
    items.into_iter().enumerate().map_while(move |(n, item)| {
        bytes += size(&item);
        (n == 0 || bytes <= MAX_PAGE_BYTES).then_some(item)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_stops_before_the_bound_and_holds_at_least_one() {
        let quarter = MAX_PAGE_BYTES / 4;
        assert_eq!(within_bytes(vec![quarter; 10], |n| *n).count(), 4);
        assert_eq!(within_bytes(vec![MAX_PAGE_BYTES * 3; 2], |n| *n).count(), 1);
        assert_eq!(within_bytes(Vec::<usize>::new(), |n| *n).count(), 0);
    }
}
