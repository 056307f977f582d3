"""Lightning data modules, one module per dataset family; configs name each by its module.

base.py         TaskDataModule (task check, loaders, detection collate), DiskDataModule
shapes.py       the synthetic shapes scenes (no download, no disk) and ShapesDataModule
imagefolder.py  class folders per split, listed by a directory walk
cifar.py        CIFAR-10 / CIFAR-100
pet.py          Oxford-IIIT Pet (breeds, or pet / background masks)
voc.py          PASCAL VOC 2012 segmentation
coco.py         COCO 2017 detection
transforms.py   the torchvision.transforms.v2 presets per task (uint8), the device's normalisation
images.py       image files as uint8 tensors (decode_jpeg for JPEGs, PIL for the rest)
sampling.py     the training order and augmentations of (seed, epoch, index)
__main__.py     python -m zootrain.data verify ROOT: decode every image under ROOT
"""
